#!/usr/bin/env bash
# Set up a virtual environment (idempotent), then run ruff, mypy and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
ruff check .
mypy
pytest -q
