# patchline — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= /usr/bin/python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
CONFIG ?= configs/default.yaml
IMAGES ?= $(DEMO)/data
ARTIFACT ?= artifacts/model

.PHONY: demo test export system-deps venv clean engine bench bench-gpu install

# Debian packages the runtime and tests use: a broker, GStreamer and its Python bindings.
system-deps:
	@command -v mosquitto >/dev/null && $(PYTHON) -c "import gi; gi.require_version('Gst', '1.0')" 2>/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients \
	      python3-venv python3-gi python3-gst-1.0 gstreamer1.0-tools gstreamer1.0-plugins-base \
	      gstreamer1.0-plugins-good gstreamer1.0-libav >/dev/null)

# --system-site-packages: GStreamer's Python bindings come from Debian, not PyPI.
$(BIN)/patchline: pyproject.toml constraints.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[export,calibration,dev,bench]'
	touch $@

venv: system-deps $(BIN)/patchline

demo: venv
	$(BIN)/patchline sample-data $(DEMO)/data
	$(BIN)/patchline export --config configs/demo.yaml --images $(DEMO)/data --out $(DEMO)/artifact
	$(BIN)/patchline sample-data $(DEMO)/val --train 0 --test-good 20 --per-defect 6 --seed 1
	$(BIN)/patchline calibrate --artifact $(DEMO)/artifact --val $(DEMO)/val --defects $(DEMO)/val
	$(BIN)/patchline quantize --artifact $(DEMO)/artifact --images $(DEMO)/data --val $(DEMO)/val
	$(BIN)/patchline eval --artifact $(DEMO)/artifact --data $(DEMO)/data
	$(BIN)/python -m patchline.runtime.demo --dir $(DEMO)

export: venv
	$(BIN)/patchline export --config $(CONFIG) --images $(IMAGES) --out $(ARTIFACT)

# GPU box only: TensorRT (the 'gpu' extra, or JetPack's python3-libnvinfer via --system-site-packages),
# pycuda and the NVIDIA driver. The engine is cached per ONNX, TensorRT version, GPU and precision.
engine: venv
	$(BIN)/patchline engine --artifact $(ARTIFACT) --config $(CONFIG)

# Engine, distance kernel vs cuBLAS (needs CuPy), end to end; JSON under bench/results/.
BENCH_ARTIFACT ?= $(DEMO)/artifact
bench-gpu: venv
	test -f $(BENCH_ARTIFACT)/manifest.json || $(MAKE) demo
	$(BIN)/patchline bench-gpu --artifact $(BENCH_ARTIFACT) --config $(CONFIG)

# pytest exits 5 when it collects no test: not a failure of the code under test.
test: venv
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# The daemon as a systemd service (as root): a venv in $(PREFIX), a system user, the unit patchline@.service.
# Then: write /etc/patchline/<camera>.yaml (see configs/line.yaml), the MQTT password (if any) to systemd's
# credential store, /etc/credstore/patchline-<camera>.mqtt-password (mode 0600), and
# `systemctl enable --now patchline@<camera>`.
PREFIX ?= /opt/patchline
UNIT_DIR ?= /etc/systemd/system
install: system-deps
	id -u patchline >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /nonexistent \
	  --shell /usr/sbin/nologin --user-group --groups video patchline
	$(PYTHON) -m venv --system-site-packages $(PREFIX)/venv
	$(PREFIX)/venv/bin/pip install -q -c constraints.txt .
	install -d -m 0755 /etc/patchline
	install -d -m 0700 /etc/credstore
	install -m 0644 configs/line.yaml /etc/patchline/example.yaml.sample
	sed 's|/opt/patchline|$(PREFIX)|g' deploy/patchline@.service > $(UNIT_DIR)/patchline@.service
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
