# medserve: `make demo` runs the main job on the embedded model; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo-data

.PHONY: demo test test-all bench bench-tenants venv clean

$(BIN)/medserve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the range in pyproject admits the local CPU wheel, not a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(BIN)/medserve

demo: venv
	$(BIN)/medserve sample-ct $(DEMO) --seed 7
	$(BIN)/medserve up
	$(BIN)/medserve segment $(DEMO)/series --out $(DEMO)/mask.nii.gz --truth $(DEMO)/truth.nii.gz; \
	  status=$$?; $(BIN)/medserve down; exit $$status

test: venv
	$(BIN)/python -m pytest -m "not slow"

test-all: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/medserve bench --size small

bench-tenants: venv
	$(BIN)/python -m benchmarks.noisy_neighbour

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
