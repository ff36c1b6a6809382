# medserve: `make demo` runs the main job on the embedded model; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo-data

.PHONY: demo demo-wsi test test-fast fuzz lint format docs bench bench-wsi bench-tenants venv clean niivue swagger-ui

# The browser viewer's niivue, pinned; `make niivue` refreshes the vendored bundle from npm.
NIIVUE_VERSION ?= 0.69.0
# /docs's Swagger UI, pinned; `make swagger-ui` refreshes the vendored files from npm.
SWAGGER_UI_VERSION ?= 5.36.0

$(BIN)/medserve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the range in pyproject admits the local CPU wheel, not a multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test,docs]"
	# cuCIM's CuImage reads slides on a CPU too; without --no-deps pip would add GBs of CUDA libraries.
	$(BIN)/pip install --quiet --no-deps "cucim-cu13==26.10.0"
	touch $@

venv: $(BIN)/medserve

# Both jobs on the embedded models: a CT study segmented, then a whole-slide image turned into a heatmap.
demo: venv
	$(BIN)/medserve sample-ct $(DEMO) --seed 7
	$(BIN)/medserve sample-slide $(DEMO)/slide.tiff --seed 7
	$(BIN)/medserve up
	$(BIN)/medserve segment $(DEMO)/series --out $(DEMO)/mask.nii.gz --truth $(DEMO)/truth.nii.gz \
	  && $(BIN)/medserve wsi submit $(DEMO)/slide.tiff --model he-tile-tumour --upload --out demo; \
	  status=$$?; $(BIN)/medserve down; exit $$status

# The WSI part alone.
demo-wsi: venv
	$(BIN)/medserve sample-slide $(DEMO)/slide.tiff --seed 7
	$(BIN)/medserve up
	$(BIN)/medserve wsi submit $(DEMO)/slide.tiff --model he-tile-tumour --upload --out demo; \
	  status=$$?; $(BIN)/medserve down; exit $$status

# Every test, slow ones and the live servers included: what CI runs.
test: venv
	$(BIN)/python -m pytest

# The tests that start no Ray cluster: seconds, for the edit-test loop.
test-fast: venv
	$(BIN)/python -m pytest -m "not cluster"

# The property-based tests with many more generated examples than CI runs.
fuzz: venv
	MEDSERVE_FUZZ_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_study_readers_fuzz.py tests/test_upload_fuzz.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The documentation site (docs/, mkdocs.yml), rebuilt on every save; 8000 is medserve's own port.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The benchmarks run from a checkout (benchmarks/ is not installed): `python -m benchmarks.pipeline --help`.
bench: venv
	$(BIN)/python -m benchmarks.pipeline --size small

bench-wsi: venv
	$(BIN)/python -m benchmarks.wsi --size small

bench-tenants: venv
	$(BIN)/python -m benchmarks.noisy_neighbour

niivue:
	scripts/vendor_niivue.sh $(NIIVUE_VERSION)

swagger-ui:
	scripts/vendor_swagger_ui.sh $(SWAGGER_UI_VERSION)

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info
