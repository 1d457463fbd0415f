# The README's two commands: `make demo` and `make test`. Each creates .venv with Python 3.12 when it is missing and
# installs longctx into it (editable, with the dev extra); later runs reuse it.
VENV     := .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo

.PHONY: demo test venv clean

demo: $(STAMP)
	$(PY) -m longctx.train --config configs/tiny.py --workdir $(DEMO_DIR) --resume
	$(PY) -m longctx.eval --workdir $(DEMO_DIR) --lengths 256,512,1024,2048 --positions all --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal --durations=15 tests

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || { python=$$(scripts/find_python.sh) && echo "creating $(VENV) with $$python" && $$python -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
