# Two commands matter: `make demo` and `make test`. Both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ROOT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test bench clean browser

install: $(STAMP) browser

# Headless Chromium renders the HTML report in its test (Debian's package; needs root or sudo once).
browser:
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

# torch and torchvision come first and pinned, so pip takes the wheels that lie on this machine's disk
# instead of resolving a newer CUDA build. img2dataset drags in the `dataclasses` backport, which shadows the
# standard library in subprocesses (Prefect's server) and breaks pydantic: it is removed afterwards.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip uninstall -q -y dataclasses || true
	$(BIN)/python -c "import dataclasses, sys; assert 'site-packages' not in (dataclasses.__file__ or ''), dataclasses.__file__"
	touch $(STAMP)

demo: install
	$(BIN)/capfilt demo --root $(ROOT)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) runs .pytest_cache
