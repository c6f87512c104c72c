# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= out/demo

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# Pin the CPU build of torch first; an unpinned torch may pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/torchslim demo --out $(OUT) --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Every benchmark in turn (BENCH_ARGS=--quick for a short run); each prints a table and writes benchmarks/results/.
BENCHMARKS := pruning quantization distill_lowrank deep_compression search
bench: $(VENV)/.installed
	set -e; for b in $(BENCHMARKS); do $(PY) benchmarks/$$b.py $(BENCH_ARGS); done

clean:
	rm -rf $(VENV) out
