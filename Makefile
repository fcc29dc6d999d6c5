# qlm — the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
OUT ?= out

.PHONY: help setup install test lint typecheck unit proto up down status kafka-jars demo bench sim-quick clean docs bench-http results results-quick

help:
	@echo "make setup     install what a clean Debian machine lacks (apt, pip, Kafka jars); test and demo run it"
	@echo "make test      lint + type-check + every test, on real Redis and real Kafka"
	@echo "make demo      the whole stack on real Redis + Kafka with simulated GPU workers"
	@echo "make proto     regenerate qlm/api/v1 from proto/qlm/v1"
	@echo "make up/down   start/stop Redis + Kafka + the services under .qlm/ (POLICY=fcfs WORKERS=f.yaml TIME_SCALE=x)"
	@echo "make kafka-jars  fetch the Kafka broker jars from Maven Central (cached)"
	@echo "make bench     the benchmarks (results under docs/results/)"
	@echo "make results   regenerate at HEAD every CPU result in docs/results/ + its headline table (hours on 2 cores)"
	@echo "make results-quick  the same steps at a small size into out/results-quick/ (a check that each runs)"
	@echo "make gpu-stage vLLM + Redis/Kafka for the GPU host, as parcels of one device call each"

# Everything a clean Debian machine lacks: redis-server, Maven + Java 17 (for the Kafka
# jars), the Python packages, the Kafka jars from Maven Central. Redone when
# pyproject.toml or the Kafka pom changes; `make test` and `make demo` depend on it.
SETUP_STAMP := .qlm/setup.stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml qlm/localstack/kafka-pom.xml
	@if ! command -v redis-server >/dev/null || ! command -v mvn >/dev/null || ! command -v java >/dev/null \
	    || ! command -v chromium >/dev/null || ! command -v wrk >/dev/null; then \
	  echo "installing redis-server, maven, openjdk-17, chromium (status page test), wrk (bench-http) (apt)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server maven openjdk-17-jre-headless chromium wrk >/dev/null; \
	fi
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PYTHON) -m qlm.localstack fetch-jars
	@mkdir -p $(dir $@) && touch $@

install: setup

lint:
	$(PYTHON) -m ruff check qlm services loadgen tests

typecheck:
	$(PYTHON) -m mypy

unit:
	$(PYTHON) -m pytest -q tests/unit

test: setup lint typecheck
	$(PYTHON) -m pytest -q

proto:
	$(PYTHON) proto/generate.py

kafka-jars:
	$(PYTHON) -m qlm.localstack fetch-jars

POLICY ?= qlm
WORKERS ?= docker/workers.cpu.yaml
TIME_SCALE ?= 1
up:
	$(PYTHON) -m qlm.localstack up --dir .qlm --policy $(POLICY) --workers-file $(WORKERS) --time-scale $(TIME_SCALE)

down:
	$(PYTHON) -m qlm.localstack down --dir .qlm

status:
	$(PYTHON) -m qlm.localstack status --dir .qlm

demo: setup
	$(PYTHON) -m loadgen.demo --dir .qlm/demo --out $(OUT)/demo

# Every result in docs/results/ the CPU can make, regenerated at HEAD, then the headline
# table of docs/results/README.md from the summaries (python -m loadgen.regenerate --list)
JOBS ?= 2
results: setup
	$(PYTHON) -m loadgen.regenerate --jobs $(JOBS)

results-quick: setup
	$(PYTHON) -m loadgen.regenerate --quick --jobs $(JOBS)

sim-quick:
	$(PYTHON) -m loadgen.sim --workload WA --quick --out $(OUT)/sim-WA

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache $(OUT)

bench-store:
	$(PYTHON) -m loadgen.bench_store --out docs/results/bench_store.json

# Redis memory per queued request (docs/scaling.md)
bench-redis-memory:
	$(PYTHON) -m loadgen.bench_redis_memory --out docs/results/bench_redis_memory.json

# ghz (gRPC load tool, Go) drives bench-submit without taking the server's cores
GHZ_VERSION ?= v0.120.0
GHZ ?= $(HOME)/.cache/qlm/bin/ghz
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)

.PHONY: ghz
ghz: $(GHZ)

$(GHZ):
	GOBIN=$(dir $(GHZ)) $(GO) install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

# the configuration of docs/results/bench_submit_ghz.json (1 ingest process: as many
# submits/s as 2 on these cores, less CPU per submit, lower p99)
bench-submit: $(GHZ)
	PATH="$(dir $(GHZ)):$$PATH" $(PYTHON) -m loadgen.bench_submit --load ghz --server-cpus 0 --kafka-cpus 1 --load-cpus 1 --out docs/results/bench_submit_ghz_pinned.json

# HTTP admissions (OpenAI API, wrk) against gRPC Submit (ghz) on one ingest process: ingest
# on core 0, Redis + Kafka and the load tools on core 1
bench-http: $(GHZ)
	PATH="$(dir $(GHZ)):$$PATH" $(PYTHON) -m loadgen.bench_http --ingest-cpus 0 --kafka-cpus 1 --load-cpus 1 --out docs/results/bench_http.json

bench-worker:
	$(PYTHON) -m loadgen.bench_worker --requests 200 --warmup 20 --out docs/results/bench_worker.json

profiles:
	$(PYTHON) -m loadgen.profiles

estimator-check:
	$(PYTHON) -m loadgen.regenerate --only estimator-check-A100-80GB,estimator-check-A10-24GB,estimator-check-H100-80GB

gpu-fidelity:
	$(PYTHON) -m loadgen.gpu.fidelity docs/results/gpu/h100_replay_mistral-7b.json.gz docs/results/gpu/h100_replay_mistral-7b_high_load.json.gz --out docs/results/gpu/fidelity.json

bench-scheduler:
	$(PYTHON) -m loadgen.bench_scheduler --queued 100000 --workers 80 --steps 20 --policies "qlm;qlm:fair_share=false;fcfs" --out docs/results/bench_scheduler.json

# the same step with a million queued (fills Redis with 1M requests first: several minutes)
bench-scheduler-1m:
	$(PYTHON) -m loadgen.bench_scheduler --queued 1000000 --workers 80 --steps 20 --policies "qlm;qlm:fair_share=false;fcfs" --out docs/results/bench_scheduler_1m.json

bench-estimator:
	$(PYTHON) -m loadgen.bench_estimator --queued 100000 --workers 80 --rounds 10 --queries 50 --out docs/results/bench_estimator.json

bench-decide:
	taskset -c 0 $(PYTHON) -m loadgen.bench_decide --queued 100000 --workers 80 --policies qlm,qlm:fair_share=false,fcfs,edf,shepherd --iterations 300 --reference-iterations 300 --out docs/results/bench_decide.json

docs:  ## regenerate the generated docs (configuration reference)
	$(PYTHON) -m services.configdoc > docs/config.md

# Everything the GPU host needs (docs/results/gpu/README.md), as parcels of one device call
# each: vLLM 0.25.0 + its wheels (.stage/vsite.tar.xz), Redis + Kafka + the services' wheels
# (.stack/stack.tar.xz), cut into .stage/parcel-1..N, each small enough to travel with the
# repository. On the host: python3 -m loadgen.gpu.stage unpack .stage/parcel-K, in order.
.PHONY: gpu-stage
gpu-stage: .stage/vsite.tar.xz .stack/stack.tar.xz
	$(PYTHON) -m loadgen.gpu.stage parcels

.stage/vsite.tar.xz: loadgen/gpu/stage.py
	$(PYTHON) -m loadgen.gpu.stage fetch
	$(PYTHON) -m loadgen.gpu.stage vllm

.stack/stack.tar.xz: loadgen/gpu/stage_stack.sh loadgen/gpu/unpack_stack.sh
	PYTHON=$(PYTHON) bash loadgen/gpu/stage_stack.sh

# Redis + Kafka + the missing wheels for a GPU host without network, Java or redis-server
# (needs openjdk-17-jdk-headless for jlink/jmods): .stack/stack.tar.xz, unpacked there by
# loadgen/gpu/unpack_stack.sh; then python3 -m loadgen.gpu.stack_replay.
.PHONY: stack-archive
stack-archive:
	PYTHON=$(PYTHON) bash loadgen/gpu/stage_stack.sh
