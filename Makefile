# Two commands from a fresh clone: `make quickstart` and `make test`.
# Both create .venv when it is missing and install the package with the torch build pinned in
# requirements-dev.txt (the one this machine keeps on disk), then act.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q -c requirements-dev.txt -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/digits/run.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mmcontrast data_tools tests bench examples

bench: $(STAMP)
	@echo "Benchmarks print one table each; see README.md for the commands and measured figures."

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
