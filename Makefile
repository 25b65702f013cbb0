# The two set-up commands of the README. Both create .venv and install what they need.
PY := .venv/bin/python
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.venv/ready: pyproject.toml  ## serving only: no training stack (torch is behind the training extra)
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch .venv/ready

.venv/dev-ready: .venv/ready  ## everything: training, tests, linters
	$(PY) -m pip install -q -e ".[dev]"
	touch .venv/dev-ready

node_modules/.ready: package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts
	touch node_modules/.ready

.PHONY: serve test web-assets chromium
web-assets:  ## onnxruntime-web (npm) for the search page's in-browser encoder; Debian's npm first if there is none
	@command -v npm >/dev/null 2>&1 || { $(APT) update -qq && $(APT) install -y -qq npm; }
	@$(MAKE) --no-print-directory node_modules/.ready

chromium:  ## Debian's Chromium for the browser tests, unless one is there ($$CONCORD_CHROMIUM or /usr/bin/chromium)
	@[ -n "$$CONCORD_CHROMIUM" ] || [ -x /usr/bin/chromium ] || { $(APT) update -qq && $(APT) install -y -qq chromium; }

serve: .venv/ready  ## start the search server with the shipped release and the embedded store
	@$(MAKE) --no-print-directory web-assets || echo "make: warning: onnxruntime-web is not installed; the page" \
		"will search by sending the photo to the server (run 'npm ci' to encode in the browser)" >&2
	.venv/bin/concord serve

test: .venv/dev-ready web-assets chromium  ## lint, type-check and run the test suite (browser tests included)
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/pytest -q
