# The README's commands. Everything installs into .venv; nothing outside the project is touched
# except, best effort, Debian packages: tcmalloc for training, redis-server for the store tests,
# chromium for the report test and a Java 17 runtime for PySpark.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo

.PHONY: setup demo test bench bench-env lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	# tcmalloc makes CPU training faster (2.1x in MEASURED.md) (best effort: skipped without apt or root)
	-command -v apt-get >/dev/null && { dpkg -s libgoogle-perftools4 >/dev/null 2>&1 || \
	  (apt-get install -y -q libgoogle-perftools4 || (apt-get update -q && apt-get install -y -q libgoogle-perftools4)) >/dev/null 2>&1; }
	# redis-server: the store tests start a throwaway one on a free port (best effort; they skip without it)
	-command -v apt-get >/dev/null && { dpkg -s redis-server >/dev/null 2>&1 || \
	  (apt-get install -y -q redis-server || (apt-get update -q && apt-get install -y -q redis-server)) >/dev/null 2>&1; }
	# chromium: the report test renders report.html headless (best effort; it skips without it)
	-command -v apt-get >/dev/null && { dpkg -s chromium >/dev/null 2>&1 || \
	  (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null 2>&1; }
	# a Java runtime for PySpark (prepare/embed --engine spark; best effort: the Spark tests skip without it)
	-command -v apt-get >/dev/null && { dpkg -s openjdk-17-jre-headless >/dev/null 2>&1 || \
	  (apt-get install -y -q openjdk-17-jre-headless || (apt-get update -q && apt-get install -y -q openjdk-17-jre-headless)) >/dev/null 2>&1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: pip takes the CPU build from this machine's disk
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,serve,redis,report,llm,spark]'
	# MovieLens-100k ships inside the recbole wheel; --no-deps keeps RecBole's pins out of our env
	$(PY) -m pip install --quiet --no-deps recbole==1.2.1
	touch $(STAMP)

demo: setup
	$(BIN)/pantherseq demo --out $(RUN)

test: setup
	$(BIN)/pytest -q

# RecBole (the peer we compare with) needs numpy<2 and old pandas: its own venv, .venv-bench
bench-env: setup
	bash benchmarks/bench-env.sh

bench: setup bench-env
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/nextevent.py

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .venv-bench runs .pytest_cache
