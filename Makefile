# `make test` and `make demo` set themselves up: .venv with pinned dependencies.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo demo-convert install clean bench

$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -q

# Trains a small CLIP from scratch on scikit-learn's digits (CPU, ~1-2 min), checks held-out zero-shot
# accuracy >= 90%, writes out/demo/report.json and plots. Run again, it resumes the finished run in
# out/demo and only re-evaluates; `rm -rf out/demo` to train afresh.
demo: $(STAMP)
	$(PY) experiments/train.py --config experiments/configs/digits.py --workdir out/demo

# Converts an open_clip ViT-B-32 (random init) to clipjax and compares both on real photos.
demo-convert: $(STAMP)
	$(PY) experiments/demo.py --out out/demo-convert

bench: $(STAMP)
	$(PY) benchmarks/encode.py

clean:
	rm -rf $(VENV) .pytest_cache
