# The two commands the README gives a newcomer:
#   make demo   - set up .venv and run the main job on a local Ray
#   make test   - set up .venv and run the whole test suite
PY := .venv/bin/python
DEMO_OUT ?= runs/demo

.PHONY: setup demo test bench world-tiny clean
setup:
	@bash scripts/setup_env.sh

# The whole loop (collect, pretrain, levels, BC + PPO in imagination, real-game evaluation, report.html).
demo: setup
	$(PY) -m pipelines.cli demo --out $(DEMO_OUT) $(DEMO_ARGS)

# Collect 3000 BabyAI GoToLocal episodes and pretrain the tiny world model (about 14 min on 2 cores).
world-tiny: setup
	$(PY) -m pipelines.cli collect --source babyai:BabyAI-GoToLocal-v0 --episodes 3000 --policy mixed \
	    --epsilon 0.3 --episodes-per-shard 100 --workers 2 --seed 0 --out runs/gotolocal-3k
	$(PY) -m pipelines.cli pretrain --data runs/gotolocal-3k --out runs/world-tiny --preset tiny

# The browser tests drive Debian's chromium; scripts/install_browser.sh installs it when missing.
test: setup
	@bash scripts/install_browser.sh
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) bench/collect.py
	$(PY) bench/world_model.py
	$(PY) bench/serving.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf runs .pytest_cache
