# patchline — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= /usr/bin/python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
CONFIG ?= configs/default.yaml
IMAGES ?= $(DEMO)/data
ARTIFACT ?= artifacts/model
# The extra that brings the ONNX Runtime: cpu; gpu-cu12 or gpu-cu13 on an x86 box with an NVIDIA GPU (with
# TensorRT, pycuda, CuPy of that CUDA major); cpu,jetson on a Jetson. Exactly one: they overwrite each other.
RUNTIME_EXTRA ?= cpu

SPARKPLUG := runtime/sinks/sparkplug
.PHONY: proto demo demo-artifact test test-py311 test-py310 export system-deps venv clean engine bench bench-line bench-protocols bench-gpu gpu-check install

# Debian packages the runtime and tests use: a broker, GStreamer and its Python bindings.
system-deps:
	@command -v mosquitto >/dev/null && $(PYTHON) -c "import gi; gi.require_version('Gst', '1.0')" 2>/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients \
	      python3-venv python3-gi python3-gst-1.0 gstreamer1.0-tools gstreamer1.0-plugins-base \
	      gstreamer1.0-plugins-good gstreamer1.0-libav >/dev/null)

# --system-site-packages: GStreamer's Python bindings come from Debian, not PyPI.
$(BIN)/patchline: pyproject.toml constraints.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[$(RUNTIME_EXTRA),export,calibration,dev]'
	touch $@

venv: system-deps $(BIN)/patchline

# The runtime also runs on Python 3.10 (JetPack 6); its tests run there too, in a venv with only the runtime and
# its test tools: no torch, no calibration extra, no GStreamer bindings (Debian builds them for its 3.11 only).
PYTHON310 ?= /root/.pyenv/versions/3.10.13/bin/python
VENV310   ?= .venv310
$(VENV310)/bin/patchline: pyproject.toml constraints.txt
	@test -x $(PYTHON310) || { echo "make test: no Python 3.10 at $(PYTHON310), which the runtime's tests also run on;" \
	  "install one (pyenv install 3.10.13) or name it: make test PYTHON310=/path/to/python3.10" >&2; exit 1; }
	$(PYTHON310) -m venv $(VENV310)
	$(VENV310)/bin/pip install -q -c constraints.txt --upgrade pip 'setuptools>=68' wheel
	$(VENV310)/bin/pip install -q -c constraints.txt -e '.[cpu,test]'
	touch $@

# Sparkplug B's payload classes from sparkplug_b.proto (committed; tests/test_sparkplug.py checks them).
proto: venv
	$(BIN)/python -m grpc_tools.protoc -I$(SPARKPLUG) --python_out=$(SPARKPLUG) $(SPARKPLUG)/sparkplug_b.proto

# The demo's calibrated model, which make demo, bench-gpu and gpu-check start from.
demo-artifact: venv
	$(BIN)/patchline sample-data $(DEMO)/data
	$(BIN)/patchline export --config configs/demo.yaml --images $(DEMO)/data --out $(DEMO)/artifact
	$(BIN)/patchline sample-data $(DEMO)/val --train 0 --test-good 20 --per-defect 6 --seed 1
	$(BIN)/patchline calibrate --artifact $(DEMO)/artifact --val $(DEMO)/val --defects $(DEMO)/val

demo: demo-artifact
	$(BIN)/patchline quantize --artifact $(DEMO)/artifact --images $(DEMO)/data --val $(DEMO)/val
	$(BIN)/patchline eval --artifact $(DEMO)/artifact --data $(DEMO)/data
	$(BIN)/python -m patchline.runtime.tools.demo --dir $(DEMO)

export: venv
	$(BIN)/patchline export --config $(CONFIG) --images $(IMAGES) --out $(ARTIFACT)

# GPU box only: TensorRT (make venv RUNTIME_EXTRA=gpu-cu12, or JetPack's python3-libnvinfer via
# --system-site-packages), pycuda and the NVIDIA driver. The engine is cached per ONNX, TensorRT version, GPU and precision.
engine: venv
	$(BIN)/patchline engine --artifact $(ARTIFACT) --config $(CONFIG)

# Engine, distance kernel vs cuBLAS (needs CuPy), end to end; JSON under bench/results/.
BENCH_ARTIFACT ?= $(DEMO)/artifact
bench-gpu: venv
	test -f $(BENCH_ARTIFACT)/manifest.json || $(MAKE) demo-artifact
	$(BIN)/patchline bench-gpu --artifact $(BENCH_ARTIFACT) --config $(CONFIG)

# GPU box only: the prepared check (README "GPU check") — the demo artifact, then every GPU combination's scores
# against the CPU runtime, the GPU tests and bench-gpu, in one JSON report under bench/results/. Its own venv with
# the GPU extra: a CPU venv's onnxruntime and onnxruntime-gpu would overwrite each other.
GPU_EXTRA ?= gpu
VENV_GPU  ?= .venv-gpu
gpu-check:
	test -f $(DEMO)/artifact/manifest.json || $(MAKE) demo-artifact VENV=$(VENV_GPU) RUNTIME_EXTRA=$(GPU_EXTRA)
	$(MAKE) venv VENV=$(VENV_GPU) RUNTIME_EXTRA=$(GPU_EXTRA)
	$(VENV_GPU)/bin/patchline gpu-check --artifact $(DEMO)/artifact --images $(DEMO)/data/test --out bench/results

# The whole suite on Python 3.11, then the runtime's tests on Python 3.10.
test: test-py311 test-py310

# pytest exits 5 when it collects no test: not a failure of the code under test.
test-py311: venv
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# Test artifacts are exported by the 3.11 venv (torch); the run fails when too few tests passed (tests/conftest.py).
test-py310: venv $(VENV310)/bin/patchline
	PATCHLINE_RUNTIME_ONLY=1 PATCHLINE_EXPORT_PYTHON=$(abspath $(BIN))/python $(VENV310)/bin/python -m pytest -q

# The daemon as a systemd service (as root): a venv in $(PREFIX), a system user, the unit patchline@.service.
# RUNTIME_EXTRA (above) picks the ONNX Runtime and, on a GPU box, TensorRT: make install RUNTIME_EXTRA=gpu-cu12.
# Then: write /etc/patchline/<camera>.yaml (see configs/line.yaml), the MQTT password (if any) to systemd's
# credential store, /etc/credstore/patchline-<camera>.mqtt-password (mode 0600), and
# `systemctl enable --now patchline@<camera>`.
PREFIX ?= /opt/patchline
UNIT_DIR ?= /etc/systemd/system
install: system-deps
	id -u patchline >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
	  --shell /usr/sbin/nologin --user-group --groups video$$(getent group render >/dev/null && echo ,render) patchline
	$(PYTHON) -m venv --system-site-packages $(PREFIX)/venv
	$(PREFIX)/venv/bin/pip install -q -c constraints.txt '.[$(RUNTIME_EXTRA)]'
	install -d -m 0755 /etc/patchline
	install -d -m 0700 /etc/credstore
	install -m 0644 configs/line.yaml /etc/patchline/example.yaml.sample
	sed 's|/opt/patchline|$(PREFIX)|g' deploy/patchline@.service > $(UNIT_DIR)/patchline@.service
	install -m 0644 deploy/patchline-nvidia-devices.service $(UNIT_DIR)/
	install -d -m 0755 -o patchline -g patchline /var/cache/patchline  # the cameras' shared engine cache
	systemctl daemon-reload 2>/dev/null || true

clean:
	rm -rf $(DEMO) artifacts .pytest_cache

# CPU benchmark (README "Benchmark"), three cases built once into bench/cache, all wide_resnet50_2 (layers 2+3,
# seeded random weights): synthetic parts at 224×224 with a 16384-row bank from 200 images (the first headline
# case), and real photographs (60 crops of scikit-image's bundled photographs) with a 6144-row bank at 224×224 and
# at anomalib's default 256×256, the latter also INT8-quantised for the opt-in fast variant.
BENCH_CACHE ?= bench/cache
BENCH_ARGS  ?= --variants exact,plain --compare
BENCH_REAL_ARGS ?= --variants exact,plain,exact@model.int8.onnx --compare --accuracy $(BENCH_CACHE)/real-data
EXPORT_BENCH = $(BIN)/patchline export --config configs/demo.yaml --quiet
$(BENCH_CACHE)/synthetic-data/train:
	$(BIN)/patchline sample-data $(BENCH_CACHE)/synthetic-data --train 200 --test-good 20 --per-defect 10
$(BENCH_CACHE)/real-data/train:
	$(BIN)/patchline sample-data $(BENCH_CACHE)/real-data --real --train 60 --test-good 20 --per-defect 10
$(BENCH_CACHE)/synthetic-224/manifest.json: | $(BENCH_CACHE)/synthetic-data/train
	$(EXPORT_BENCH) --images $(BENCH_CACHE)/synthetic-data --out $(@D) --set preprocess.image_size=224 \
	  --set coreset.ratio=0.10449
$(BENCH_CACHE)/real-224/manifest.json: | $(BENCH_CACHE)/real-data/train
	$(EXPORT_BENCH) --images $(BENCH_CACHE)/real-data --out $(@D) --set preprocess.image_size=224 \
	  --set coreset.ratio=0.1306123
$(BENCH_CACHE)/real-256/manifest.json: | $(BENCH_CACHE)/real-data/train
	$(EXPORT_BENCH) --images $(BENCH_CACHE)/real-data --out $(@D) --set preprocess.image_size=256 --set coreset.ratio=0.1
$(BENCH_CACHE)/real-256/model.int8.onnx: | $(BENCH_CACHE)/real-256/manifest.json
	$(BIN)/patchline quantize --artifact $(@D) --images $(BENCH_CACHE)/real-data --limit 60
bench: venv $(BENCH_CACHE)/synthetic-224/manifest.json $(BENCH_CACHE)/real-224/manifest.json \
       $(BENCH_CACHE)/real-256/model.int8.onnx
	$(BIN)/patchline bench --artifact $(BENCH_CACHE)/synthetic-224 --images $(BENCH_CACHE)/synthetic-data $(BENCH_ARGS)
	$(BIN)/patchline bench --artifact $(BENCH_CACHE)/real-224 --images $(BENCH_CACHE)/real-data $(BENCH_ARGS)
	$(BIN)/patchline bench --artifact $(BENCH_CACHE)/real-256 --images $(BENCH_CACHE)/real-data $(BENCH_REAL_ARGS)

# Many cameras in one process against as many single-camera processes (1, 2, 4, 8 cameras, ~6 min), on the demo's
# video and model (docs/benchmarks.md "Many cameras in one process"). On a GPU box: make bench-line VENV=.venv-gpu
# RUNTIME_EXTRA=gpu BENCH_LINE_ARGS="--device cuda --fps 120" (a rate that saturates it: inspected below 100 %).
BENCH_LINE_ARGS ?=
bench-line: venv
	test -f $(DEMO)/line.avi || $(MAKE) demo
	$(BIN)/python bench/line_throughput.py --demo $(DEMO) $(BENCH_LINE_ARGS)

# Each protocol's output alone (verdict -> a client in another process), then all of them in one daemon with the demo
# model and a live camera (docs/benchmarks.md "The line's protocols beside MQTT"); JSON under bench/results/.
bench-protocols: venv
	test -f $(DEMO)/artifact/manifest.json || $(MAKE) demo-artifact
	for protocol in mqtt opcua sparkplug modbus; do $(BIN)/python bench/$${protocol}_latency.py || exit 1; done
	$(BIN)/python bench/protocols_e2e.py --artifact $(DEMO)/artifact
	$(BIN)/python bench/protocols_e2e.py --artifact $(DEMO)/artifact --trigger-every 1.5
