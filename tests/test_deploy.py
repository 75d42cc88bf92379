"""docker-compose.yml, read as data (no Docker engine here): services, volumes, GPUs and documented variables."""

from __future__ import annotations

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
    assert services["worker"]["environment"]["MIADPO_GENERATION_BACKEND"] == "openai"
    assert services["worker"]["environment"]["MIADPO_OPENAI_BASE_URL"] == "http://vllm:8000/v1"
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
