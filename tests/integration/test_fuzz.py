"""Schemathesis against the live server's OpenAPI schema: every operation, no 5xx, every response as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from model.artifact import Artifact
from tests.support import ADMIN_TOKEN, ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIN_CASES = 1000
TIME_LIMIT = 180  # seconds; the run takes about a minute on a quiet machine
# Schema-valid requests that these operations must still refuse, because validity there is beyond a JSON schema:
# an upload is any bytes but must decode to an image with ink, and a V2 tensor's data must match its shape.
# Refusals there are 4xx with a message (the 5xx and conformance checks still apply to every case).
INHERENTLY_LOOSE = """
[[operations]]
include-path = "/v1/predict/image"
checks.positive_data_acceptance.expected-statuses = ["2XX", "3XX", 401, 403, 404, 409, 429, "5XX", 400, 422]

[[operations]]
include-path-regex = "^/v2/models/.*/infer$"
checks.positive_data_acceptance.expected-statuses = ["2XX", "3XX", 401, 403, 404, 409, 429, "5XX", 400]
"""


def config(name: str, version: str) -> str:
    """Path parameters are the served model most of the time (else every V2 model route is just a 404)."""
    return f"""
[dictionaries]
models = {{ values = [{json.dumps(name)}] }}
versions = {{ values = [{json.dumps(version)}] }}

[parameters]
"path.name" = {{ dictionary = "models", probability = 0.8 }}
"path.version" = {{ dictionary = "versions", probability = 0.8 }}
{INHERENTLY_LOOSE}"""


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    server: ServerProcess, tiny_artifact: Artifact, tmp_path: Path
) -> None:
    (tmp_path / "schemathesis.toml").write_text(config(tiny_artifact.meta.name, tiny_artifact.meta.version))
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml"),
        "run", f"{server.url}/openapi.json",
        "--checks", "all",
        "--max-examples", "80",  # per operation and phase; ~1,500 cases over the 17 operations
        "--workers", "1",  # the machine is shared
        "--request-timeout", "30",
        # Admin routes are fuzzed with the token, so that their 200s are checked too (test_hostile covers bad auth).
        "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
        "--report", "json", "--report-json-path", str(tmp_path / "report.json"),
        "--no-color",
    ]  # fmt: skip
    try:
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=TIME_LIMIT, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"schemathesis ran past {TIME_LIMIT} s:\n{str(exc.stdout)[-3000:]}")
    output = run.stdout[-6000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())

    assert report["operations"]["selected"] == report["operations"]["total"] == report["operations"]["tested"] == 17, (
        report["operations"]
    )
    assert report["operations"]["errored"] == 0 and not report["errors"], output
    assert not report["failures"], output
    assert report["test_cases"]["generated"] >= MIN_CASES, report["test_cases"]
    assert report["test_cases"]["errored"] == 0 and report["test_cases"]["with_failures"] == 0, output
    assert all(status == "success" for status in (p["status"] for p in report["phases"].values())), report["phases"]
    assert run.returncode == 0, output

    assert httpx.get(f"{server.url}/readyz").status_code == 200
    logs = server.logs()
    assert "unhandled error" not in logs and "Traceback" not in logs, logs[-5000:]
