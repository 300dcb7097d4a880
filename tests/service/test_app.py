"""The HTTP process stays torch-free: building the app, starting it and serving predictions imports neither torch
nor onnxruntime (the model runs in the inference worker process). In a subprocess, so no other test's imports
count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

pytestmark = pytest.mark.integration  # starts a real inference worker process

_SERVE_ONE = """
import asyncio, sys
import httpx
from pathlib import Path
from service.app import create_app
from service.settings import Settings

async def main():
    app = create_app(Settings(artifact_dir=Path(sys.argv[1]), drift_window=16))
    async with app.router.lifespan_context(app):
        for _ in range(600):
            if app.state.serving.model is not None:
                break
            await asyncio.sleep(0.1)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            answer = await client.post("/v1/predict", json={"instances": [[0.0] * 784]})
            assert answer.status_code == 200, answer.text
            assert (await client.get("/metrics")).status_code == 200
            assert (await client.get("/v1/drift")).status_code == 200
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime", "onnx"))
    print("heavy:", heavy[:5])

asyncio.run(main())
"""


def test_the_http_process_serves_without_importing_torch_or_onnxruntime(tiny_artifact_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SERVE_ONE, str(tiny_artifact_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "heavy: []" in out.stdout, out.stdout
