"""DPO + LoRA training on tiny models, TRL style: real trainer, real models, real files (CPU).

One short training per family is shared by the first tests (module fixture); resuming gets its own runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import TrainerCallback

from trainer.callbacks import ProgressCallback
from trainer.checkpoints import MARKER, list_checkpoints
from trainer.config import TrainHyperparameters
from trainer.data import load_pairs
from trainer.train import run_training
from workers.models import load_model

FAMILIES = ("tiny-llava", "tiny-qwen2.5-vl")
VISION_PARTS = ("vision_tower", "multi_modal_projector", "visual")  # LLaVA tower + projector, Qwen2.5-VL tower + merger
# Big enough a learning rate, no warm-up, small rank: the adapter visibly moves in a few steps.
FAST = {"lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-3, "warmup_ratio": 0.0}


class Snapshot(TrainerCallback):
    """Keeps the trained model and copies of its trainable parameters as training starts."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _base_name(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def _step_log(result):
    return [(h["step"], h["loss"], h["rewards/margins"]) for h in result.log_history if "loss" in h]


def _inputs(processor, row):
    """The model inputs of an export row's prompt + chosen answer."""
    text = processor.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    return processor(text=[text], images=row["images"], return_tensors="pt")


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory, tiny_settings, pair_exports):
    """3 steps of DPO on 8 pairs with a checkpoint every 2 steps (so at 2 and, the last step, 3)."""
    family = request.param
    out = tmp_path_factory.mktemp(f"train-{family}")
    events: list[dict] = []

    def report(event: dict) -> None:
        # What a reader sees at the moment it hears about a checkpoint.
        complete = event["event"] == "checkpoint" and (Path(event["path"]) / MARKER).is_file()
        events.append({**event, "complete_when_reported": complete})

    snapshot = Snapshot()
    hp = TrainHyperparameters(max_steps=3, **FAST)
    result = run_training(
        model=family, export_dir=pair_exports[family], output_dir=out, hp=hp, checkpoint_every=2,
        callbacks=[snapshot, ProgressCallback(report)], settings=tiny_settings,
    )
    return {"family": family, "out": out, "result": result, "events": events, "snapshot": snapshot}


def test_lora_weights_change_and_base_weights_do_not(trained, tiny_settings):
    model, before = trained["snapshot"].model, trained["snapshot"].before
    assert before and all("lora_" in n for n in before)  # only the adapter trains
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    fresh = dict(load_model(trained["family"], tiny_settings).model.named_parameters())
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach(), fresh[_base_name(name)]), name


def test_lora_only_on_language_model_linears(trained):
    names = [n for n, _ in trained["snapshot"].model.named_parameters() if "lora_" in n]
    assert names and all("language_model" in n for n in names)
    assert not any(part in n for n in names for part in VISION_PARTS)
    kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with safe_open(trained["result"].adapter_dir / "adapter_model.safetensors", "pt") as fh:
        saved = list(fh.keys())
    assert saved and all("language_model" in k for k in saved)
    assert not any(part in k for k in saved for part in VISION_PARTS)


def test_result_and_files(trained):
    result = trained["result"]
    assert (result.global_step, result.total_steps, result.start_step) == (3, 3, 0)
    assert not result.cancelled and result.resumed_from is None
    assert result.adapter_dir == trained["out"] / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (result.adapter_dir / name).is_file(), name
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 8
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(result.metrics)
    assert result.summary["train_runtime"] > 0


def test_saved_adapter_loads_and_changes_logits(trained, tiny_settings, pair_exports, tmp_path):
    family = trained["family"]
    row = load_pairs(pair_exports[family], cache_dir=tmp_path)[0]
    handle = load_model(family, tiny_settings)
    inputs = _inputs(handle.processor, row)
    with torch.no_grad():
        base_logits = handle.model(**inputs).logits
        model = PeftModel.from_pretrained(handle.model, trained["result"].adapter_dir).eval()
        adapted_logits = model(**inputs).logits
        trained_model = trained["snapshot"].model.eval()
        trained_logits = trained_model(**inputs).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-6)
    torch.testing.assert_close(adapted_logits, trained_logits)  # the file holds what was trained


def test_progress_reports_every_step_and_checkpoint(trained):
    events = trained["events"]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]
    for e in steps:
        assert e["total_steps"] == 3 and e["lr"] is not None and e["epoch"] > 0
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert isinstance(e["metrics"][key], float), key
    # Which way the policy moved is test_dpo_direction.py's business (a margin computed from the model itself).
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in saved] == [2, 3]
    assert all(e["complete_when_reported"] and "loss" in e["metrics"] for e in saved)
    assert events[-1]["event"] == "summary"


def test_checkpoints_are_complete(trained):
    checkpoints = list_checkpoints(trained["out"])
    assert [c.step for c in checkpoints] == [2, 3] == [c.step for c in trained["result"].checkpoints]
    for c in checkpoints:
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
            assert (c.path / name).is_file(), name
        assert json.loads((c.path / "trainer_state.json").read_text())["global_step"] == c.step
        assert "rewards/accuracies" in c.metrics


@pytest.mark.parametrize("family", FAMILIES)
def test_cancel_then_resume_from_latest_checkpoint(family, tmp_path, tiny_settings, pair_exports):
    """Cancelled after step 2 of 4 (checkpoint every 2); a second run resumes at step 2 and finishes
    exactly as an uninterrupted run does (adapter, optimizer, scheduler, data order and RNG restored)."""
    hp = TrainHyperparameters(max_steps=4, **FAST)
    straight = run_training(model=family, export_dir=pair_exports[family], output_dir=tmp_path / "straight",
                            hp=hp, checkpoint_every=None, settings=tiny_settings)
    tmp_path = tmp_path / "resumed"
    polls: list[int] = []

    def cancel_during_step_2() -> bool:
        polls.append(1)
        return len(polls) >= 2

    first_events: list[dict] = []
    first = run_training(
        model=family, export_dir=pair_exports[family], output_dir=tmp_path, hp=hp, checkpoint_every=2,
        callbacks=[ProgressCallback(first_events.append, cancel_during_step_2)], settings=tiny_settings,
    )
    assert first.cancelled and first.global_step == 2 and first.adapter_dir is None
    assert [c.step for c in first.checkpoints] == [2]
    assert not (tmp_path / "adapter").exists()
    # A half-written later checkpoint (the process died mid-save) is neither listed nor resumed from.
    partial = tmp_path / "checkpoint-3"
    shutil.copytree(first.checkpoints[0].path, partial, ignore=shutil.ignore_patterns(MARKER, "optimizer.pt"))
    assert [c.step for c in list_checkpoints(tmp_path)] == [2]

    events: list[dict] = []
    second = run_training(
        model=family, export_dir=pair_exports[family], output_dir=tmp_path, hp=hp, checkpoint_every=2,
        callbacks=[ProgressCallback(events.append)], settings=tiny_settings,
    )
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps[0] == 3 and steps == [3, 4]
    assert (second.start_step, second.global_step, second.total_steps) == (2, 4, 4)
    assert second.resumed_from == tmp_path / "checkpoint-2" and not second.cancelled
    assert [c.step for c in second.checkpoints] == [2, 4] and not partial.exists()
    assert (second.adapter_dir / "adapter_model.safetensors").is_file()
    assert _step_log(second) == _step_log(straight)  # bit-exact on CPU
    # ... on the fast path (trainer.fast), the reference log-probs precomputed: the defaults.
    assert straight.fast_path and straight.ref_precomputed and second.fast_path and second.ref_precomputed

    # A job retried after the training finished: nothing left to train, the same adapter again.
    with safe_open(second.adapter_dir / "adapter_model.safetensors", "pt") as fh:
        adapter = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    third = run_training(
        model=family, export_dir=pair_exports[family], output_dir=tmp_path, hp=hp, checkpoint_every=2,
        settings=tiny_settings,
    )
    assert (third.start_step, third.global_step, third.cancelled) == (4, 4, False)
    with safe_open(third.adapter_dir / "adapter_model.safetensors", "pt") as fh:
        assert all(torch.equal(fh.get_tensor(k), v) for k, v in adapter.items())


def test_cancel_saves_a_checkpoint_and_resume_false_starts_over(tmp_path, tiny_settings, pair_exports):
    family = "tiny-qwen2.5-vl"
    kw = {"model": family, "export_dir": pair_exports[family], "output_dir": tmp_path, "settings": tiny_settings}
    cancelled = run_training(hp=TrainHyperparameters(max_steps=3, **FAST), checkpoint_every=2,
                             callbacks=[ProgressCallback(lambda event: None, lambda: True)], **kw)
    assert cancelled.cancelled and cancelled.global_step == 1
    assert [c.step for c in cancelled.checkpoints] == [1]  # off the every-2 schedule: saved because of the cancel
    again = run_training(hp=TrainHyperparameters(max_steps=1, **FAST), checkpoint_every=None, resume=False, **kw)
    assert again.start_step == 0 and again.global_step == 1 and not again.cancelled
    assert again.checkpoints == [] and list(tmp_path.glob("checkpoint-*")) == []
    assert again.adapter_dir.is_dir()
