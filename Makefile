# The two commands of the README. Both create .venv on first use.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/glmae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(BIN)/glmae
	$(BIN)/glmae demo --out runs/demo

test: $(BIN)/glmae
	$(BIN)/python -m pytest -q

lint: $(BIN)/glmae
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
