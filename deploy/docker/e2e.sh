#!/usr/bin/env bash
# The container end-to-end test: stand-in base images, the project image, the compose stack, a clean teardown.
#
#   deploy/docker/e2e.sh [pytest options...]     # e.g. -x; CI=1 turns "docker unavailable" from a skip into a failure
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
exec "${PYTHON:-.venv/bin/python}" -m pytest tests/e2e/test_compose.py -m e2e -q "$@"
