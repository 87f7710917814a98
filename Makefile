# Two commands: `make demo` (set up, then export the default model for the default device) and
# `make test` (set up if needed, lint, run the tests). Everything lives in .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.slimx-installed

.PHONY: setup demo test lint bench clean refit wheel-check

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/slimx export --out out/demo

lint: setup
	$(VENV)/bin/ruff check .

# the suite on both cores (pytest-xdist), then the tests that judge measured latencies or wall-clock timeouts, alone
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -n 2 -m "not timing"
	$(VENV)/bin/python -m pytest -m timing

# the wheel from `python -m build`, installed into a fresh virtual environment, runs the README's quickstart
wheel-check: setup
	.ci/wheel-check

# refit every shipped device profile from the published tables in ../shared/data (about two minutes once the timm
# op mixes are cached): each device's own fit first, then the family fits, which ship where their grouped error is lower
DATA ?= ../shared/data
refit: setup
	$(VENV)/bin/slimx devices calibrate iphone12 --measurements $(DATA)/iphone12_coreml.csv
	$(VENV)/bin/slimx devices calibrate iphone11pro --measurements $(DATA)/iphone11pro_iphone7_coreml.csv
	$(VENV)/bin/slimx devices calibrate iphone7 --measurements $(DATA)/iphone11pro_iphone7_coreml.csv
	$(VENV)/bin/slimx devices calibrate jetson-nano --measurements $(DATA)/jetson_tensorrt_fp16.csv
	$(VENV)/bin/slimx devices calibrate jetson-agx-xavier --measurements $(DATA)/jetson_tensorrt_fp16.csv
	$(VENV)/bin/slimx devices calibrate pixel3 --measurements $(DATA)/pixel3_tflite.csv
	$(VENV)/bin/slimx devices calibrate jetson-tx2 --setting tensorrt-gpu-fp32 \
	  --measurements $(DATA)/jetson_tx2_tensorrt.csv
	$(VENV)/bin/slimx devices calibrate --family apple-ane --measurements $(DATA)/iphone12_coreml.csv \
	  --measurements $(DATA)/iphone11pro_iphone7_coreml.csv --measurements $(DATA)/iphone13_coreml.csv \
	  --measurements $(DATA)/iphone14_coreml.csv
	$(VENV)/bin/slimx devices calibrate --family apple-gpu --measurements $(DATA)/iphone11pro_iphone7_coreml.csv
	$(VENV)/bin/slimx devices calibrate --family apple-cpu --measurements $(DATA)/iphone11pro_iphone7_coreml.csv
	$(VENV)/bin/slimx devices calibrate --family jetson --measurements $(DATA)/jetson_tensorrt_fp16.csv \
	  --measurements $(DATA)/jetson_netspresso_tensorrt_fp16.csv --measurements $(DATA)/jetson_tx2_tensorrt.csv
	$(VENV)/bin/slimx devices calibrate --family pixel --measurements $(DATA)/pixel3_tflite.csv \
	  --measurements $(DATA)/pixel1_2_3_mobilenet_tflite.csv --measurements $(DATA)/pixel1_mnasnet_tflite.csv

clean:
	rm -rf out .pytest_cache .ruff_cache
