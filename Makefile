# Every target builds .venv from the project's own files first, so each works on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/datasets/dogs-vs-cats

.PHONY: install demo test test-fast docs docs-serve docs-figures notebooks model bench chromium redis-server nginx clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[serve,tune,test,docs,notebooks]'
	touch $(STAMP)

install: $(STAMP)

# The main job: check the data, evaluate the shipped model, write a submission, solve challenges, plot.
demo: $(STAMP)
	$(BIN)/asirra demo --data $(DATA) --out runs/demo

# Everything CI runs: unit tests and the slower end-to-end tests (browser included).
test: $(STAMP) chromium redis-server nginx
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser"

# The documentation site, strict (a broken link or a missing page fails it), into build/site; docs-serve previews it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8001

# The drawn pictures of the site and the README (no dataset photos): the study's plot, the challenge page.
docs-figures: $(STAMP) chromium
	$(BIN)/python docs/figures.py

# The example notebooks as .ipynb (without outputs) beside their committed .py.
notebooks: $(STAMP)
	$(BIN)/jupytext --to ipynb examples/*.py

# Retrain the default model shipped in src/asirra/weights/ (recorded command; see its model card).
model: $(STAMP)
	rm -rf runs/default-model
	$(BIN)/asirra train --model effnet-lite2 --strategy finetune --unfreeze 1 --views 2 --epochs 5 --lr 1e-3 \
		--schedule cosine --label-smoothing 0.1 --weight-decay 1e-4 --seed 0 --data $(DATA)/train --out runs/default-model
	$(BIN)/asirra export --model runs/default-model --package --int8 --calibration $(DATA)/test1

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py --data $(DATA)/train
	$(BIN)/python benchmarks/bench_inference.py --data $(DATA)
	$(BIN)/python benchmarks/load_test.py --data $(DATA)/train

# Debian's Chromium for the browser test; skipped quietly where we are not root (the test then says why it skips).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed (needs root): browser tests will skip"; }

# Debian's redis-server for the Redis store's tests (each test starts its own on a free port); as for chromium.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || echo "redis-server not installed (needs root): Redis tests will skip"; }

# Debian's nginx for the reverse-proxy test (it starts its own on a free loopback port); as for chromium.
# Installed without starting Debian's own nginx on port 80: policy-rc.d says no, or RUNLEVEL=1 where there is none.
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && RUNLEVEL=1 apt-get install -y -qq nginx >/dev/null) || echo "nginx not installed (needs root): the reverse-proxy tests will skip"; }

clean:
	rm -rf $(VENV) runs .pytest_cache
