"""DPO moves the policy the right way: a short run raises chosen over rejected against the reference.

The margin is computed here, not read from TRL's logs: for each pair, the summed log-probability of the
answer's tokens after the prompt (images included) under the policy and under the reference (the same
model with its adapter disabled), then

    margin = [log p(chosen) - log p_ref(chosen)] - [log p(rejected) - log p_ref(rejected)].

A training whose loss pushed the wrong way (chosen and rejected swapped, the loss's sign flipped) would
still log changing losses and non-zero `rewards/margins`; this margin would fall below zero.
Pure DPO (no NLL term on the chosen answer), the whole handful of pairs in every step, constant learning
rate, no dropout: each step is one plain gradient step on the DPO loss of these very pairs.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from tests.trainer.conftest import FAMILIES, write_export
from trainer.config import TrainHyperparameters
from trainer.data import load_pairs
from trainer.train import run_training
from workers.models import load_model

NUM_PAIRS, STEPS = 4, 3
HP = TrainHyperparameters(
    max_steps=STEPS, per_device_batch_size=NUM_PAIRS, learning_rate=1e-3, lr_scheduler="constant", warmup_ratio=0.0,
    lora_r=8, lora_alpha=16, lora_dropout=0.0, dpo_weight=1.0, nll_weight=0.0,
)


def _answer_logprob(model, processor, row, answer_key: str) -> float:
    """log p(answer | prompt, images): the sum over the answer's tokens (and the turn's end) after the prompt."""
    prompt_text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    full_text = processor.apply_chat_template(row["prompt"] + row[answer_key], tokenize=False)
    prompt = processor(text=[prompt_text], images=row["images"], return_tensors="pt")
    full = processor(text=[full_text], images=row["images"], return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    assert torch.equal(full["input_ids"][0, :n], prompt["input_ids"][0]) and full["input_ids"].shape[1] > n
    logits = model(**full).logits[0, n - 1 : -1].float()
    targets = full["input_ids"][0, n:]
    return float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum())


class MarginProbe(TrainerCallback):
    """The mean margin over the pairs after every optimizer step, from the live model."""

    def __init__(self, processor, rows) -> None:
        self.processor, self.rows = processor, rows
        self.margins: list[float] = []

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        policy = [[_answer_logprob(model, self.processor, r, k) for k in ("chosen", "rejected")] for r in self.rows]
        with model.disable_adapter():
            reference = [[_answer_logprob(model, self.processor, r, k) for k in ("chosen", "rejected")] for r in self.rows]
        model.train(was_training)
        margins = [(pc - rc) - (pr - rr) for (pc, pr), (rc, rr) in zip(policy, reference, strict=True)]
        self.margins.append(sum(margins) / len(margins))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_dpo_run_raises_chosen_over_rejected(family, tmp_path, tiny_settings):
    export = write_export(tmp_path / "export", num_pairs=NUM_PAIRS, seed=1)
    rows = list(load_pairs(export, cache_dir=tmp_path / "cache"))
    probe = MarginProbe(load_model(family, tiny_settings).processor, rows)
    result = run_training(model=family, export_dir=export, output_dir=tmp_path / "out", hp=HP, checkpoint_every=None,
                          callbacks=[probe], settings=tiny_settings)
    assert result.global_step == STEPS and not result.cancelled
    margins = probe.margins
    print(f"{family}: mean margin after each step {[round(m, 4) for m in margins]}")
    assert len(margins) == STEPS
    assert margins[0] > 0  # one step already prefers chosen (the adapter starts at zero: margin 0 before)
    assert all(b > a for a, b in zip(margins, margins[1:], strict=False)), margins  # and more with every step
    # TRL's own reward margins (beta x the same log-ratios, on the batch before each step) agree in direction.
    logged = [h["rewards/margins"] for h in result.log_history if "rewards/margins" in h]
    assert len(logged) == STEPS and logged[-1] > logged[0]
