# esam_ros: `make install` then `make test` (both safe to re-run).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTHON ?= python3.11

.PHONY: install test lint bench bench-gpu bench-qos fidelity demo weights constraints clean

# requirements*.txt give ranges (for ROS workspaces); constraints.txt pins what CI tests.
# requirements-sam2.txt (SAM 2.1) is an sdist built against the torch installed first, no CUDA.
install:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-ros.txt -r requirements-dev.txt \
		-c constraints.txt
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation -r requirements-sam2.txt \
		-c constraints.txt
	$(PIP) install -q --no-deps -e .
	scripts/build_msgs.sh $(VENV)
	$(PY) -c "import esam_core, esam_ros, sam2.build_sam; from esam_ros.msg import Entity, EntityArray; print('esam_ros installed')"

lint:
	$(VENV)/bin/ruff check .

test: lint
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

# Benchmarks print numbers (never timed tests): AMG vs E-SAM on one backend, grid and image, the
# realistic mask sets first (simulator, scene), then test_tiny SAM, then the node; the one-line
# summaries of the three AMG/E-SAM runs are repeated at the end.
BENCH = OMP_NUM_THREADS=2 $(VENV)/bin/esam bench
bench:
	mkdir -p out
	$(BENCH) --backend simulator --grids 32/64 --repeat 3 | tee out/bench.txt
	$(BENCH) --backend simulator --grids 32/64 --repeat 3 --config config/esam_fast.yaml | tee -a out/bench.txt
	$(BENCH) --backend scene --grids 32/64 --repeat 3 | tee -a out/bench.txt
	$(BENCH) --config config/test_tiny.yaml --grids 16/32 --repeat 3 | tee -a out/bench.txt
	OMP_NUM_THREADS=2 $(VENV)/bin/python -m esam_ros.bench.node --config config/test_tiny.yaml
	OMP_NUM_THREADS=2 $(VENV)/bin/python -m esam_ros.bench.node --stream
	@grep '^summary' out/bench.txt

# E-SAM vs AMG and SAM^O on simulated SAM masks (docs/fidelity.md; about an hour on 2 cores).
# COCO=ann.json [IMAGES=dir] adds annotated photos to the generated scenes.
fidelity:
	mkdir -p out
	OMP_NUM_THREADS=2 $(VENV)/bin/esam fidelity --seeds 3 --generated 2 --lowres 128 \
		$(if $(COCO),--coco $(COCO)) $(if $(IMAGES),--images $(IMAGES)) --json out/fidelity.json

# How many raw frames reach a subscription by QoS and size (one host; a few minutes).
bench-qos:
	$(VENV)/bin/python -m esam_ros.bench.qos

# On a machine with CUDA (with a source tree and any python3 that has torch: PYTHON=python3).
bench-gpu:
	PYTHON=$${PYTHON:-$(VENV)/bin/python} scripts/gpu_bench.sh out/gpu

demo:
	$(VENV)/bin/esam replay data/spot/raw_mcap --config config/esam.yaml --out out/demo_bag \
		--report out/demo_report.json --overwrite --overlay --fallback-test-tiny
	@echo "demo outputs: out/demo_bag (bag: images, entities, entity_labels, entity_overlay)," \
		"out/demo_report.json; view: Foxglove with config/foxglove_layout.json"

# Fetch an official SAM checkpoint (not part of install): make weights MODEL=vit_b
MODEL ?= vit_h
weights:
	$(VENV)/bin/esam download-weights $(MODEL) --dir weights

# After an upgrade that passes `make test`: pin what is installed now.
constraints:
	{ head -2 constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^esam'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf build install log esam_ros/msg esam_ros/esam_ros_s__*.so
