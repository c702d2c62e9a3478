# The two commands the README gives a newcomer:
#   make demo   - set up .venv and run the main job on a local Ray
#   make test   - set up .venv and run the whole test suite
PY := .venv/bin/python
DEMO_OUT ?= runs/demo-data

.PHONY: setup demo test bench clean
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m pipelines.cli collect --source babyai:BabyAI-GoToLocal-v0 --episodes 64 \
	    --policy mixed --epsilon 0.2 --workers 2 --seed 0 --out $(DEMO_OUT)
	$(PY) -m pipelines.cli info --data $(DEMO_OUT)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) bench/collect.py

clean:
	rm -rf runs .pytest_cache
