# The two commands of the README: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

install:
	@tools/install.sh

demo: install
	cd egs/mini_synth/hubert && PATH=$(abspath $(VENV))/bin:$$PATH ./run.sh

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) tools/bench/features.py

clean:
	rm -rf $(VENV) egs/mini_synth/hubert/{data,dump,exp}
