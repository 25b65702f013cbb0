# The two set-up commands of the README. Both create .venv and install what they need.
PY := .venv/bin/python

.venv/ready: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch .venv/ready

.PHONY: serve test
serve: .venv/ready  ## start the search server with the shipped release and the embedded store
	.venv/bin/concord serve

test: .venv/ready  ## lint, type-check and run the test suite
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/pytest -q
