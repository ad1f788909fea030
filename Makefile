# dyqvla_ros: `make demo` and `make test` work on a fresh machine (they run `make setup`).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# ament_index_python finds packages through AMENT_PREFIX_PATH (the venv prefix when
# ROS 2 comes from pip); DDS stays on loopback so tests never touch the LAN.
export AMENT_PREFIX_PATH := $(abspath $(VENV))$(if $(AMENT_PREFIX_PATH),:$(AMENT_PREFIX_PATH))
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint format bench closed-loop schemes-closed-loop embedded-calibration clean

setup: $(VENV)/.pkg-stamp

$(VENV)/.venv-stamp:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	touch $@

$(VENV)/.deps-stamp: $(VENV)/.venv-stamp requirements-ros.txt requirements.txt requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-ros.txt -r requirements.txt -r requirements-dev.txt
	touch $@

$(VENV)/.msgs-stamp: $(VENV)/.deps-stamp $(wildcard msg/*.txt msg/*.xml msg/*.toml msg/msg/*.msg msg/action/*.action)
	$(BIN)/python -m pip install -q --no-build-isolation ./msg
	touch $@

# Editable installs skip setup.py's data_files, so link the ament index marker,
# package.xml, launch/ and config/ into the venv's share/ the way
# `colcon build --symlink-install` would (edits to config/ show up at once).
SHARE := $(VENV)/share/dyqvla_ros
$(VENV)/.pkg-stamp: $(VENV)/.msgs-stamp setup.py setup.cfg package.xml
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p $(VENV)/share/ament_index/resource_index/packages $(SHARE)
	ln -sfn $(abspath resource/dyqvla_ros) $(VENV)/share/ament_index/resource_index/packages/dyqvla_ros
	ln -sfn $(abspath package.xml) $(SHARE)/package.xml
	ln -sfn $(abspath launch) $(SHARE)/launch
	ln -sfn $(abspath config) $(SHARE)/config
	touch $@

demo: setup
	$(BIN)/dyqvla-demo --out out/demo

test: setup
	$(BIN)/pytest -q test

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	mkdir -p out
	$(BIN)/python bench/monitor_overhead.py
	$(BIN)/python bench/kernels.py
	$(BIN)/python bench/model_step.py
	$(BIN)/python bench/node_step.py
	$(BIN)/python bench/gpu_suite.py --quick --json out/gpu_suite_quick.json

# The closed-loop benchmark of BENCHMARKS.md (about an hour on 2 cores at 200 episodes):
# calibrate on 10 held-out expert episodes, then every precision mode on the same seeds,
# then the step-wise sensitivity analysis (on the A16 successes among 60 episodes: the
# shipped policy succeeds rarely). EPISODES=20 gives a quick look.
EPISODES ?= 200
WORKERS ?= 2
# The calibration chosen on validation seeds 200000-200199 (BENCHMARKS.md [C]): the fewest
# mean bits among the settings tried whose dynamic success stayed within 99 % of A16 there.
CALIB_ARGS ?= --quantile 0.75 --d-acc 0.075
CL := out/closed_loop
closed-loop: setup
	rm -rf $(CL) && mkdir -p $(CL)
	$(BIN)/dyqvla-collect $(CL)/calib_bag --episodes 10 --seed 50000
	$(BIN)/dyqvla-profile $(CL)/calib_bag --rate 10 --out $(CL)/calibration $(CALIB_ARGS)
	$(BIN)/dyqvla-eval-sim --precision 16 8 4 2 dynamic --episodes $(EPISODES) --seed 100000 \
	    --workers $(WORKERS) --calibration $(CL)/calibration/calibration.yaml --out $(CL)/eval.json
	$(BIN)/dyqvla-sensitivity --episodes 60 --seed 100000 --stride 2 --out $(CL)/sensitivity

# [H] of BENCHMARKS.md (about 75 min on 2 cores): each quantization scheme calibrated for
# itself on the same 10 held-out expert episodes, then 16 / 4 / 2 / dynamic on the same seeds.
SCHEMES_CL := out/schemes_closed_loop
SCHEMES := none:token:128 hadamard:group:128 none:token:32 hadamard:group:32
schemes-closed-loop: setup
	rm -rf $(SCHEMES_CL) && mkdir -p $(SCHEMES_CL)
	$(BIN)/dyqvla-collect $(SCHEMES_CL)/calib_bag --episodes 10 --seed 50000
	for s in $(SCHEMES); do \
	    set -- $$(echo $$s | tr : ' '); opts="--rotation $$1 --activation-scales $$2 --group-size $$3"; \
	    $(BIN)/dyqvla-profile $(SCHEMES_CL)/calib_bag --rate 10 --out $(SCHEMES_CL)/cal_$$1_$$2_$$3 \
	        $(CALIB_ARGS) $$opts || exit 1; \
	    $(BIN)/dyqvla-eval-sim --precision 16 4 2 dynamic --episodes $(EPISODES) --seed 100000 \
	        --workers $(WORKERS) --calibration $(SCHEMES_CL)/cal_$$1_$$2_$$3/calibration.yaml $$opts \
	        --out $(SCHEMES_CL)/eval_$$1_$$2_$$3.json || exit 1; \
	done

# The calibration shipped beside the embedded policy, which the node, the demo and
# dyqvla-eval-sim use by default with it: the [C] one of BENCHMARKS.md (10 held-out expert
# episodes at 10 Hz, CALIB_ARGS). Machine paths in the file are replaced by their recipe.
EMB := out/embedded-calibration
EMB_FILE := dyqvla_ros/policies/tabletop/calibration.yaml
embedded-calibration: setup
	rm -rf $(EMB) && mkdir -p $(EMB)
	$(BIN)/dyqvla-collect $(EMB)/calib_bag --episodes 10 --seed 50000
	$(BIN)/dyqvla-profile $(EMB)/calib_bag --rate 10 --out $(EMB)/calibration $(CALIB_ARGS)
	( echo '# Shipped with the embedded policy; re-created by `make embedded-calibration` (BENCHMARKS.md [C]).'; \
	  sed -e 's|^  model: .*|  model: dyqvla_ros/policies/tabletop (the embedded policy)|' \
	      -e "s|^  - .*calib_bag$$|  - 'dyqvla-collect calib_bag --episodes 10 --seed 50000'|" \
	      $(EMB)/calibration/calibration.yaml ) > $(EMB_FILE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
