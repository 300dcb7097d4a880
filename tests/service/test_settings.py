"""Settings refuse bad values with messages that never echo a value: the admin token must not reach a log."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.support import REPO

SHORT_TOKEN = "short-secret-x"  # under the 16-character minimum
GOOD_TOKEN = "a-long-enough-secret-token-42"


def test_a_refused_token_is_not_in_the_message() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(admin_token=SHORT_TOKEN)
    assert "at least 16 characters" in str(caught.value)
    assert SHORT_TOKEN not in str(caught.value)


def test_a_refused_combination_does_not_print_the_other_settings() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(admin_token=GOOD_TOKEN, max_instances=5000, max_queue_images=100)
    assert "max_instances must be <= max_queue_images" in str(caught.value)
    assert GOOD_TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"BNSERVE_ADMIN_TOKEN": SHORT_TOKEN}, "BNSERVE_ADMIN_TOKEN: Value error, admin_token must be at least 16"),
        ({"BNSERVE_ADMIN_TOKEN": GOOD_TOKEN, "BNSERVE_MAX_INSTANCES": "5000"}, "max_instances must be <="),
    ],
)
def test_python_m_service_refuses_bad_settings_in_one_line_without_the_token(env: dict[str, str], says: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
    out = subprocess.run(
        [sys.executable, "-m", "service"], cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 3
    assert says in out.stderr and "Traceback" not in out.stderr
    assert SHORT_TOKEN not in out.stderr + out.stdout and GOOD_TOKEN not in out.stderr + out.stdout
