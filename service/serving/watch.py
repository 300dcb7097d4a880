"""Optional file watch: reload the model once the artifact's files have changed and then held still."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from service.api.errors import ApiError
from service.serving.state import ServingState

logger = logging.getLogger("service.watch")

Stamp = tuple[tuple[str, int, int, int], ...]


def artifact_stamp(directory: Path) -> Stamp | None:
    """Name, inode, mtime and size of every file in the artifact directory (None while it is missing). The inode
    tells a swapped-in copy from the file it replaced even when mtime and size are equal; every file counts, so a
    copy that lands model.json before the weights is seen again when the weights land."""
    try:
        with os.scandir(directory) as entries:
            files = [(e.name, e.stat()) for e in entries if e.is_file() and not e.name.startswith(".")]
    except OSError:
        return None
    return tuple(sorted((name, st.st_ino, st.st_mtime_ns, st.st_size) for name, st in files))


async def watch_artifact(state: ServingState) -> None:
    """Poll the artifact directory. A change is reloaded once it has held still for one poll (a copy in progress is
    not loaded half-written); a refused version is tried again only when its files change again."""
    directory = state.settings.artifact_dir
    tried = seen = artifact_stamp(directory)
    while True:
        await asyncio.sleep(state.settings.reload_poll_seconds)
        stamp = artifact_stamp(directory)
        if stamp != seen:  # still changing
            seen = stamp
            continue
        if stamp is None or stamp == tried:
            continue
        tried = stamp
        logger.info("artifact changed on disk, reloading")
        try:
            await state.reload()
        except ApiError as exc:
            logger.error("%s; trying again when the artifact's files change", exc.message)
        except Exception:  # a dead watcher would silently stop every later reload
            logger.exception("reload after an artifact change failed; still watching")
