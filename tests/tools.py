"""Locate external binaries (promtool, prometheus, docker) for tests: fail in CI when missing, skip elsewhere."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    """True when the `CI` variable is set to anything but empty, "0" or "false" (as CI systems set it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def require_binary(name: str) -> str:
    """Absolute path of `name` on PATH. Missing: the test fails under CI (it must run there), else it is skipped.

    >>> promtool = require_binary("promtool")
    >>> subprocess.run([promtool, "check", "rules", "alerts.yml"], check=True)
    """
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"`{name}` is not on PATH (Debian/Ubuntu: `apt-get install prometheus`)"
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so this test must run", pytrace=False)
    pytest.skip(reason)
