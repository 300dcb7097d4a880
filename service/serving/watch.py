"""Optional file watch: reload the model when the artifact's model.json changes."""

from __future__ import annotations

import asyncio
import logging

from service.api.errors import ApiError
from service.serving.state import ServingState
from service.wire import META_FILE

logger = logging.getLogger("service.watch")


def _stamp(state: ServingState) -> tuple[int, int, int] | None:
    """The inode tells a swapped-in copy from the file it replaced even when mtime and size are equal (a copy that
    keeps mtimes, such as re-publishing a good artifact after a refused one with the same model.json)."""
    try:
        st = (state.settings.artifact_dir / META_FILE).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


async def watch_artifact(state: ServingState) -> None:
    """Poll the artifact's metadata; on a change, reload (a failed reload keeps the current model)."""
    last = _stamp(state)
    while True:
        await asyncio.sleep(state.settings.reload_poll_seconds)
        stamp = _stamp(state)
        if stamp is None or stamp == last:
            continue
        last = stamp
        logger.info("artifact changed on disk, reloading")
        try:
            await state.reload()
        except ApiError as exc:
            logger.error("%s", exc.message)
        except Exception:  # a dead watcher would silently stop every later reload
            logger.exception("reload after an artifact change failed; still watching")
