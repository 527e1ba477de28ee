# fluxstack — the front door. `make help` lists what works today.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
OLAH_VENV ?= .venv-olah
PY := $(VENV)/bin/python
PIP_INDEX_URL ?=
export PIP_INDEX_URL
DOCKER ?= docker
export DOCKER
# CA bundle of a TLS-intercepting proxy, handed to image builds as a BuildKit secret (never a layer).
CA_BUNDLE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
export CA_BUNDLE
RUNTIME_IMAGE ?= fluxstack/runtime:dev
COMPOSE ?= $(DOCKER) compose
DEMO_DIR ?= demo
RUNTIME_PORT ?= 8000
export RUNTIME_PORT

, := ,
.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt -e .
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Create the development virtualenv (.venv) with fluxstack and test tools

# olah, the second mirror implementation the tests seed from, lives in its own venv.
$(OLAH_VENV)/.installed: requirements/olah.txt
	$(PYTHON) -m venv $(OLAH_VENV)
	$(OLAH_VENV)/bin/python -m pip install --quiet -r requirements/olah.txt
	touch $@

.PHONY: lint
lint: venv ## Lint the Python code with ruff
	$(VENV)/bin/ruff check src tests bench

.PHONY: test
test: venv lint $(OLAH_VENV)/.installed ## Run the whole test suite (unit + integration; needs root for the tmpfs tests)
	OLAH_CLI=$(abspath $(OLAH_VENV))/bin/olah-cli $(VENV)/bin/pytest tests

.PHONY: test-unit
test-unit: venv ## Run the fast unit tests only
	$(VENV)/bin/pytest tests/unit

.PHONY: manifests
manifests: venv ## List the shipped manifests and validate them
	$(VENV)/bin/fluxstack manifest list
	$(VENV)/bin/fluxstack manifest validate

.PHONY: seed
seed: ## Seed MODEL (default: FLUXSTACK_MANIFEST from .env) into the stack's model volume, with the compose seeder
	$(if $(MODEL),FLUXSTACK_MANIFEST=$(MODEL)) $(COMPOSE) run --rm seeder

.PHONY: seed-local
seed-local: venv ## Seed MANIFEST (default flux-dev) into MODELS_DIR (default ./models) without Docker
	$(VENV)/bin/fluxstack seed $(or $(MANIFEST),flux-dev) --models-dir $(or $(MODELS_DIR),models)

.PHONY: bench-seed
bench-seed: venv ## Benchmark the seeder against hf_hub_download (and aria2c) on loopback
	$(PY) bench/seed_bench.py

.PHONY: base-image
base-image: ## Build debian:trixie-slim locally with debootstrap (offline sites; needs root)
	scripts/build-base-image.sh

.PHONY: image-runtime
image-runtime: ## Build the diffusers runtime image (RUNTIME_IMAGE, default fluxstack/runtime:dev)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/diffusers/Dockerfile $(if $(CA_BUNDLE),--secret id=ca$(,)src=$(CA_BUNDLE)) \
		$(if $(PIP_INDEX_URL),--build-arg PIP_INDEX_URL=$(PIP_INDEX_URL)) -t $(RUNTIME_IMAGE) .

COMFYUI_IMAGE ?= fluxstack/comfyui:dev
COMFYUI_SRC ?=

.PHONY: image-comfyui
image-comfyui: ## Build the ComfyUI image (COMFYUI_SRC=/path: from a local tree instead of git)
	find docker/comfyui/src -mindepth 1 ! -name .fluxstack-placeholder -delete
	$(if $(COMFYUI_SRC),tar -C $(COMFYUI_SRC) --exclude=.git -c . | tar -C docker/comfyui/src -x)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/comfyui/Dockerfile $(if $(CA_BUNDLE),--secret id=ca$(,)src=$(CA_BUNDLE)) \
		$(if $(PIP_INDEX_URL),--build-arg PIP_INDEX_URL=$(PIP_INDEX_URL)) \
		$(foreach v,COMFYUI_GIT_URL COMFYUI_COMMIT COMFYUI_TREE,$(if $($(v)),--build-arg $(v)=$($(v)))) -t $(COMFYUI_IMAGE) .

.PHONY: image-gateway
image-gateway: ## Build the TLS gateway image (nginx; docs/gateway.md)
	@# compose checks every variable of the file, even to build; the build reads no token
	GATEWAY_TOKENS_FILE=$${GATEWAY_TOKENS_FILE:-/dev/null} $(COMPOSE) -f compose.yaml -f compose/gateway.yaml build gateway

SERVICES ?= runtime comfyui
MODEL ?=
WORKFLOWS ?= flux-dev-t2i

.PHONY: up
up: ## Deploy MODEL (flux-dev, flux-schnell…: SERVICES, default runtime comfyui) or, without GPU/token, the demo
	DOCKER=$(DOCKER) MODEL=$(MODEL) SERVICES="$(SERVICES)" WORKFLOWS="$(WORKFLOWS)" COMFYUI_SRC=$(COMFYUI_SRC) \
		DEMO=$(DEMO) scripts/up.sh

.PHONY: logs
logs: ## Follow the stack's logs (SERVICES to narrow)
	$(COMPOSE) logs -f --tail 100 $(if $(filter command line,$(origin SERVICES)),$(SERVICES))

.PHONY: down
down: ## Stop the stack and the demo (the model volume is kept)
	$(COMPOSE) down
	$(COMPOSE) -p fluxstack-demo --profile mirror down

.PHONY: demo
demo: venv ## Offline demo on CPU: tiny random FLUX model -> mirror -> seeder -> runtime, in compose
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)/manifests
	$(VENV)/bin/fluxstack dev tiny-model $(DEMO_DIR)/gen >/dev/null
	$(VENV)/bin/fluxstack seed $(DEMO_DIR)/gen/tiny-flux.yaml --models-dir $(DEMO_DIR)/gen/store \
		--endpoint http://127.0.0.1:9 --space-margin 0
	cp manifests/*.yaml manifests/schema.json $(DEMO_DIR)/gen/*.yaml $(DEMO_DIR)/manifests/
	FLUXSTACK_MANIFEST=tiny-flux FLUXSTACK_PROFILE=cpu HF_ENDPOINT=http://mirror:8090 SPACE_MARGIN=0 \
	MIRROR_STORE_DIR=$(abspath $(DEMO_DIR))/gen/store FLUXSTACK_MANIFESTS_HOST_DIR=$(abspath $(DEMO_DIR))/manifests \
		$(COMPOSE) -p fluxstack-demo --profile mirror up -d --build --wait runtime
	@echo "demo runtime on http://127.0.0.1:$(RUNTIME_PORT): $(VENV)/bin/fluxstack generate 'a cat' --out cat.png"

.PHONY: demo-down
demo-down: ## Remove the demo containers and their volume
	$(COMPOSE) -p fluxstack-demo --profile mirror down -v

# Ansible (docs/ansible.md): HOST is a host or group of INVENTORY, or localhost (local connection).
INVENTORY ?= ansible/inventory/hosts.yml
ANSIBLE_ARGS ?=
ANSIBLE := ANSIBLE_CONFIG=$(abspath ansible/ansible.cfg) $(abspath $(VENV))/bin/
define need_host
	@test -n "$(HOST)" || { echo "usage: make $@ HOST=gpu01 (a host or group of $(INVENTORY), or localhost)" >&2; exit 2; }
	@test -e "$(INVENTORY)" || { echo "no inventory at $(INVENTORY): cp ansible/inventory/hosts.example.yml $(INVENTORY) and edit it (or pass INVENTORY=path)" >&2; exit 2; }
endef

.PHONY: deploy
deploy: venv ## Provision HOST (host, group or localhost) with ansible/playbooks/site.yml
	$(need_host)
	$(ANSIBLE)ansible-playbook -i $(INVENTORY) ansible/playbooks/site.yml --limit '$(HOST)' $(ANSIBLE_ARGS)

.PHONY: check
check: venv ## Show what `make deploy HOST=…` would change (--check --diff), changing nothing
	$(need_host)
	$(ANSIBLE)ansible-playbook -i $(INVENTORY) ansible/playbooks/site.yml --limit '$(HOST)' --check --diff $(ANSIBLE_ARGS)

.PHONY: verify
verify: venv ## Verify HOST with testinfra (tests/host): Docker, services, store, token, GPU
	$(need_host)
	@$(ANSIBLE)python tests/host/verify.py --inventory $(INVENTORY) --hosts '$(HOST)' $(VERIFY_ARGS)

.PHONY: rollout
rollout: venv ## Roll IMAGE (and/or MANIFEST) out to HOST (default group gpu) canary-first, health-gated
	$(ANSIBLE)ansible-playbook -i $(INVENTORY) ansible/playbooks/rollout.yml --limit '$(or $(HOST),gpu)' \
		$(if $(IMAGE),-e rollout_image=$(IMAGE)) $(if $(MANIFEST),-e rollout_manifest=$(MANIFEST)) $(ANSIBLE_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) $(OLAH_VENV) .pytest_cache .ruff_cache
