"""docker-compose.yml (and docker-compose.cpu.yml on top), read as data (no Docker engine here): services,
volumes, GPUs, the training launch set-up and documented variables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from cli.main import build_parser
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def _gpu_count(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_services_and_their_roles():
    services = COMPOSE["services"]
    assert set(services) == {"redis", "api", "vllm", "worker", "worker-cpu", "trainer"}
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert services["worker"]["command"][-1] == "gpu" and services["worker-cpu"]["command"][-1] == "cpu"
    for name in ("api", "worker", "worker-cpu"):  # the names tenants may use, the same for every service
        env = services[name]["environment"]
        assert env["MIADPO_GENERATION_BACKEND"] == "openai" and env["MIADPO_MODELS_DIR"] == "/models", name
        assert env["MIADPO_GENERATION_ENDPOINTS"] == "${MIADPO_GENERATION_ENDPOINTS:-vllm=http://vllm:8000/v1}", name
        assert env["MIADPO_GENERATION_ENDPOINT"] == "${MIADPO_GENERATION_ENDPOINT:-vllm}", name
    vllm = " ".join(services["vllm"]["command"])
    assert "--limit-mm-per-prompt" in vllm and "--chat-template" in vllm and "healthcheck" in services["vllm"]
    assert "llava.jinja" in vllm


def test_served_chat_templates_are_the_families_own():
    """`vllm serve` renders prompts with the same template as generation, the attention pass and training."""
    from workers.models import FAMILIES

    for name, family in FAMILIES.items():
        path = ROOT / "deploy" / f"{name}.jinja"
        assert path.read_text() == family.chat_template + "\n", f"{path} is stale: write {name}'s chat_template into it"


def test_gpu_reservations_and_shared_volume():
    services = COMPOSE["services"]
    for name in ("vllm", "worker", "trainer"):
        devices = _gpu_count(services[name])
        assert devices and devices[0]["capabilities"] == ["gpu"], name
    for name in ("api", "worker-cpu", "redis"):
        assert not _gpu_count(services[name]), name
    for name in ("api", "worker", "worker-cpu", "trainer"):
        assert "data:/data" in services[name]["volumes"], name
        assert services[name]["environment"]["MIADPO_DATA_DIR"] == "/data"
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert set(COMPOSE["volumes"]) == {"data", "redis"}


def test_dependencies():
    services = COMPOSE["services"]
    for name in ("api", "worker", "worker-cpu", "trainer"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert services["worker"]["depends_on"]["vllm"]["condition"] == "service_healthy"


def test_commands_exist_and_settings_are_real():
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for name in ("api", "worker", "worker-cpu", "trainer"):
        assert COMPOSE["services"][name]["command"][1] in subcommands, name
    fields = {f"MIADPO_{name.upper()}" for name in Settings.model_fields}
    for service in COMPOSE["services"].values():
        for key in service.get("environment", {}):
            if key.startswith("MIADPO_"):
                assert key in fields, f"{key} is not a setting in core/settings.py"


def test_every_variable_is_documented():
    used = set(VARIABLE.findall((ROOT / "docker-compose.yml").read_text()))
    documented = {
        line.split("=", 1)[0].strip()
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert used, "the pattern found no variables"
    assert used <= documented, f"undocumented: {sorted(used - documented)}"


# -- the trainer on every GPU of its host ------------------------------------------------------------


def _default(value: str) -> str:
    """`${NAME:-default}` -> default (what compose uses with nothing set)."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:-([^}]*)\}", str(value))
    return match.group(1) if match else str(value)


def test_the_trainer_gets_every_gpu_of_its_host_and_trains_on_all_of_them():
    trainer = COMPOSE["services"]["trainer"]
    [devices] = _gpu_count(trainer)
    assert _default(devices["count"]) == "all"
    env = trainer["environment"]
    assert _default(env["MIADPO_TRAIN_PROCESSES"]) == "auto" and _default(env["MIADPO_ACCELERATE_CONFIG"]) == ""
    assert Settings(train_processes="auto", accelerate_config="").accelerate_config is None  # unset = plain DDP
    assert trainer["shm_size"]
    for name in ("worker", "vllm"):  # one GPU per worker replica; vllm's own count
        assert _gpu_count(COMPOSE["services"][name])


def test_the_deepspeed_zero2_config_is_complete():
    accelerate = yaml.safe_load((ROOT / "deploy" / "accelerate" / "deepspeed-zero2.yaml").read_text())
    assert accelerate["distributed_type"] == "DEEPSPEED" and accelerate["num_machines"] == 1
    ds_file = ROOT / accelerate["deepspeed_config"]["deepspeed_config_file"]
    ds = json.loads(ds_file.read_text())
    assert ds["zero_optimization"]["stage"] == 2
    # The batch sizes are the Trainer's (ours): DeepSpeed takes them from it.
    assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
    assert "COPY deploy/accelerate deploy/accelerate" in (ROOT / "Dockerfile").read_text()


# -- a host without GPUs: docker-compose.cpu.yml on top ------------------------------------------------


class _Tagged:
    def __init__(self, value: object) -> None:
        self.value = value


class _Reset(_Tagged):
    pass


class _Override(_Tagged):
    pass


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags: `!reset` drops what the file below set, `!override` replaces it."""


for _tag, _kind in (("!reset", _Reset), ("!override", _Override)):
    _ComposeLoader.add_constructor(
        _tag,
        lambda loader, node, kind=_kind: kind(
            loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
            else loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
            else loader.construct_scalar(node)
        ),
    )


def _merge(base: object, over: object) -> object:
    """Compose's merge of an override file, for what ours uses: mappings merge key by key, anything else
    (commands, scalars) is replaced; `!override` replaces a mapping whole."""
    if isinstance(over, _Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            if isinstance(value, _Reset):
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value)
        return merged
    return over


CPU_FILE = (ROOT / "docker-compose.cpu.yml").read_text()
CPU_HOST = _merge(yaml.load((ROOT / "docker-compose.yml").read_text(), Loader=_ComposeLoader),
                  yaml.load(CPU_FILE, Loader=_ComposeLoader))


def test_a_cpu_host_serves_generation_with_transformers_serve_and_reserves_no_gpu():
    services = CPU_HOST["services"]
    started = {name for name, service in services.items() if not service.get("profiles")}
    assert started == {"redis", "api", "transformers-serve", "worker", "worker-cpu", "trainer"}
    for name in started:
        assert not _gpu_count(services[name]), name
    serve = services["transformers-serve"]
    assert serve["command"][:2] == ["transformers", "serve"] and "${VLLM_MODEL" in serve["command"][2]
    command = " ".join(serve["command"])
    assert "--device cpu" in command and "--port 8000" in command and "--host 0.0.0.0" in command
    assert "http://localhost:8000/health" in serve["healthcheck"]["test"]
    assert serve["environment"]["HF_HUB_OFFLINE"] == "1" and any(v.endswith(":/models:ro") for v in serve["volumes"])
    assert "'.[serving]'" in (ROOT / "Dockerfile").read_text()  # the image has the `transformers` command

    worker = services["worker"]
    assert worker["environment"]["MIADPO_GENERATION_BACKEND"] == "openai"
    for name in ("api", "worker", "worker-cpu"):
        assert services[name]["environment"]["MIADPO_GENERATION_ENDPOINTS"] == "transformers-serve=http://transformers-serve:8000/v1"
        assert services[name]["environment"]["MIADPO_GENERATION_ENDPOINT"] == "transformers-serve"
    assert worker["depends_on"]["transformers-serve"]["condition"] == "service_healthy"
    assert worker["deploy"]["replicas"] == "${MIADPO_GPU_WORKERS:-1}"
    for name in ("worker", "trainer"):
        assert services[name]["environment"]["MIADPO_DEVICE"] == "cpu", name
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0", name  # the rest is kept
    for name in started:  # nothing waits for a service that is not started
        assert set(services[name].get("depends_on", {})) <= started, name


def test_every_variable_of_the_cpu_file_is_documented():
    documented = {
        line.split("=", 1)[0].strip()
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    used = set(VARIABLE.findall(CPU_FILE))
    assert used and used <= documented, sorted(used - documented)
