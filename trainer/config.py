"""Training hyperparameters (DESIGN 2.7) and the one place they become TRL / peft configs.

`TrainHyperparameters` is what a user may set (the `hyperparameters` object of `POST /v1/trainings`):
every knob has the paper's default (or the official script's, where the paper is silent) and a one-line
help, and a bad value raises `ValueError` naming the parameter and the value. `build_configs` maps it,
with the choices that are not the user's (precision per device, reference model, checkpointing,
logging), to a `trl.DPOConfig` and a `peft.LoraConfig`; nothing else in the project builds either.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from trl import DPOConfig

# Training presets (the `preset` of a training): the values a preset gives to the hyperparameters a request
# does not set itself. `paper`: the MIA-DPO paper (3 epochs, NLL weight 0.1 on the chosen answer);
# `official_code`: the released script (1 epoch, NLL weight 0, batch 1 x accumulation 8 x 8 GPUs = 64 pairs per
# step, warm-up 0.1 linear, and LoRA dropout 0, as its trainer zeroes every dropout).
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"num_epochs": 3, "nll_weight": 0.1},
    "official_code": {
        "num_epochs": 1,
        "nll_weight": 0.0,
        "effective_batch_size": 64,
        "lora_dropout": 0.0,
        "warmup_ratio": 0.1,
        "lr_scheduler": "linear",
    },
}

# LoRA on the language model's linear layers only: not the vision tower, not the projector / merger
# (their modules live outside `language_model`; Qwen2.5-VL's vision blocks have gate/up/down_proj too).
LM_LINEAR_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class TrainHyperparameters:
    """DPO + LoRA hyperparameters; defaults from the MIA-DPO paper and its official training script."""

    beta: float = field(
        default=0.1, metadata={"help": "DPO beta: how far the policy may move from the reference (paper: 0.1)."}
    )
    dpo_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the DPO (sigmoid) loss; 0 with nll_weight > 0 trains on the chosen answers alone (SFT)."},
    )
    nll_weight: float = field(
        default=0.1,
        metadata={"help": "Weight of the NLL loss on the chosen answer (paper's gamma; TRL 'sft' loss weight); 0 = off."},
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate (paper: 5e-5)."})
    num_epochs: int = field(default=3, metadata={"help": "Passes over the pair set (paper: 3; official script: 1)."})
    per_device_batch_size: int = field(default=1, metadata={"help": "Pairs per device per forward pass."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Forward passes per optimizer step (official script: 8, on 8 GPUs: 64 pairs per step)."},
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Pairs per optimizer step over all processes; sets the accumulation to "
            "ceil(this / (per_device_batch_size x processes)) on the machine that trains (official: 64). None: off."
        },
    )
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Fraction of the steps spent warming the learning rate up (official: 0.1)."}
    )
    lr_scheduler: str = field(
        default="linear", metadata={"help": f"Learning-rate schedule after warm-up, one of {', '.join(LR_SCHEDULERS)}."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (official script: 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables clipping."})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (official script: 128)."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA scaling numerator: scale = alpha / r (official: 256)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch (LLaVA default: 0.05)."})
    lora_target: str = field(
        default=LM_LINEAR_TARGET,
        metadata={"help": "Regex (full match on module names) of the layers that get LoRA; default: the LM's linears."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate prompt+answer to this many tokens; None = never (a LLaVA-1.5 image alone is 576 tokens)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of LoRA init, data order and dropout."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides num_epochs); None = no cap."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward: about 1/3 the memory, about 1.4x the time."}
    )
    logging_steps: int = field(default=1, metadata={"help": "Report metrics every this many optimizer steps."})
    fast_path: bool = field(
        default=True,
        metadata={"help": "One forward per pair over [prompt, chosen, rejected], the prompt and images computed once "
                  "(same loss and gradients; LLaVA and Qwen2.5-VL; false: TRL's two sequences per pair)."},
    )
    precompute_ref_logps: bool = field(
        default=True,
        metadata={"help": "Compute the reference (adapter-disabled) log-probs once before training, stored with "
                  "the training (false: TRL's reference forward in every step)."},
    )

    def __post_init__(self) -> None:
        _number("beta", self.beta, low=0.0, low_open=True)
        _number("dpo_weight", self.dpo_weight, low=0.0)
        _number("nll_weight", self.nll_weight, low=0.0)
        if self.dpo_weight == 0 and self.nll_weight == 0:
            raise ValueError("dpo_weight and nll_weight are both 0: there is nothing to train")
        _number("learning_rate", self.learning_rate, low=0.0, low_open=True, high=1.0)
        _integer("num_epochs", self.num_epochs, low=1)
        _integer("per_device_batch_size", self.per_device_batch_size, low=1)
        _integer("gradient_accumulation_steps", self.gradient_accumulation_steps, low=1)
        if self.effective_batch_size is not None:
            _integer("effective_batch_size", self.effective_batch_size, low=1)
            if self.gradient_accumulation_steps != 1:
                raise ValueError(
                    "set effective_batch_size or gradient_accumulation_steps, not both "
                    f"(got {self.effective_batch_size} and {self.gradient_accumulation_steps})"
                )
        _number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0, high_open=True)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("max_grad_norm", self.max_grad_norm, low=0.0)
        _integer("lora_r", self.lora_r, low=1)
        _integer("lora_alpha", self.lora_alpha, low=1)
        _number("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if not isinstance(self.lora_target, str) or not self.lora_target.strip():
            raise ValueError(f"lora_target must be a non-empty regex, got {self.lora_target!r}")
        try:
            re.compile(self.lora_target)
        except re.error as exc:
            raise ValueError(f"lora_target is not a valid regex ({exc}), got {self.lora_target!r}") from None
        if self.max_length is not None:
            _integer("max_length", self.max_length, low=1)
        _integer("seed", self.seed, low=0)
        if self.max_steps is not None:
            _integer("max_steps", self.max_steps, low=1)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        _integer("logging_steps", self.logging_steps, low=1)
        for name in ("fast_path", "precompute_ref_logps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return asdict(self)

    def accumulation(self, num_processes: int = 1) -> int:
        """Forward passes per optimizer step on `num_processes` processes."""
        if self.effective_batch_size is None:
            return self.gradient_accumulation_steps
        return max(1, math.ceil(self.effective_batch_size / (self.per_device_batch_size * num_processes)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainHyperparameters:
        """Build from a (partial) mapping; missing keys take their defaults, unknown keys raise ValueError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(names))}")
        return cls(**dict(data))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> one-line help (for CLI --help and API docs)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


def _number(name: str, value: object, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


def _integer(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def build_configs(
    hp: TrainHyperparameters,
    output_dir: Path,
    *,
    device: str | torch.device,
    checkpoint_every: int | None,
    num_processes: int = 1,
) -> tuple[DPOConfig, LoraConfig]:
    """The DPO and LoRA configs for one training.

    Args:
        hp: the user's hyperparameters.
        output_dir: where the trainer writes `checkpoint-N` folders.
        device: "cuda" (bf16 mixed precision) or "cpu" (fp32, `use_cpu`).
        checkpoint_every: save a resumable checkpoint every this many optimizer steps (and at the last
            step); None = no checkpoints.
        num_processes: processes training together (`trainer.launch`, DDP): one optimizer step takes
            per_device_batch_size x gradient_accumulation_steps x num_processes pairs, and
            `effective_batch_size` divides by it.
    Returns:
        (DPOConfig, LoraConfig). The reference model is the policy with its adapter disabled: no
        `ref_model` is passed to DPOTrainer. The speed-ups (hp.fast_path, hp.precompute_ref_logps) are
        arguments of trainer.fast.FastDPOTrainer, not of the config.
    """
    import torch
    from peft import LoraConfig
    from trl import DPOConfig

    if checkpoint_every is not None:
        _integer("checkpoint_every", checkpoint_every, low=1)
    _integer("num_processes", num_processes, low=1)
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    on_gpu = kind == "cuda"
    losses = [(name, weight) for name, weight in (("sigmoid", hp.dpo_weight), ("sft", hp.nll_weight)) if weight > 0]
    loss_type, loss_weights = [name for name, _ in losses], [weight for _, weight in losses]
    args = DPOConfig(
        output_dir=str(output_dir),
        # -- the objective
        beta=hp.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        max_length=hp.max_length,  # None: TRL's 1024 default would cut LLaVA's 576-token images
        # TRL refuses to precompute for vision data; trainer.fast.FastDPOTrainer does it itself when
        # hp.precompute_ref_logps, with TRL's routine, in batches of this many pairs.
        precompute_ref_log_probs=False,
        precompute_ref_batch_size=4 * hp.per_device_batch_size,
        # TRL zeroes every dropout by default, LoRA's included; keep the user's lora_dropout meaningful
        # (LLaVA and Qwen2.5-VL have no other dropout).
        disable_dropout=False,
        # -- optimisation
        learning_rate=hp.learning_rate,
        num_train_epochs=hp.num_epochs,
        max_steps=hp.max_steps if hp.max_steps is not None else -1,
        per_device_train_batch_size=hp.per_device_batch_size,
        gradient_accumulation_steps=hp.accumulation(num_processes),
        warmup_steps=hp.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the total steps
        lr_scheduler_type=hp.lr_scheduler,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        # TRL's default is True; ours is the user's choice (transformers 5 renamed it activation_checkpointing)
        activation_checkpointing=hp.gradient_checkpointing,
        seed=hp.seed,
        # -- several processes (trainer.launch): every LoRA weight takes part in every forward pass, so DDP
        # need not search the graph for unused ones after each backward
        ddp_find_unused_parameters=False,
        # -- precision and device
        bf16=on_gpu,
        fp16=False,
        use_cpu=not on_gpu,
        # -- data: images are decoded and processed by the collator on the fly; metadata columns are
        # dropped by the trainer (remove_unused_columns keeps images/prompt/chosen/rejected for vision).
        remove_unused_columns=True,
        dataloader_num_workers=2 if on_gpu else 0,
        dataloader_pin_memory=on_gpu,
        # -- checkpoints: full state (adapter, optimizer, scheduler, RNG) so a restart resumes exactly
        save_strategy="steps" if checkpoint_every else "no",
        save_steps=checkpoint_every or 500,
        save_only_model=False,
        save_total_limit=None,
        # -- reporting: metrics go through our callbacks, not to wandb/tensorboard or a progress bar
        logging_strategy="steps",
        logging_steps=hp.logging_steps,
        report_to=[],
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=hp.lora_target,
        bias="none",
    )
    return args, lora
