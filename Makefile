# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Browser tests drive Debian's chromium through playwright (playwright's own
# browser download cannot work without internet).
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test bench soak install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(PY) setup.py
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/pipert run examples/video_analytics.yaml --rpc --api --start

test: install $(CHROMIUM)
	$(PY) -m pytest

bench: install
	$(PY) bench/run.py

soak: install
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) *.egg-info
