"""Hyperparameter validation and the mapping to TRL / peft configs."""

from __future__ import annotations

import re

import pytest

from trainer.config import LM_LINEAR_TARGET, TrainHyperparameters, build_configs


def test_defaults_are_the_papers():
    hp = TrainHyperparameters()
    assert (hp.beta, hp.nll_weight, hp.learning_rate, hp.num_epochs) == (0.1, 0.1, 5e-5, 3)
    assert (hp.lora_r, hp.lora_alpha, hp.lora_dropout) == (128, 256, 0.05)
    assert hp.max_length is None and hp.lora_target == LM_LINEAR_TARGET
    assert set(TrainHyperparameters.help()) == set(hp.to_dict()) and all(TrainHyperparameters.help().values())


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("beta", 0), ("beta", -1.0), ("beta", float("nan")), ("beta", "0.1"), ("nll_weight", -0.1),
        ("learning_rate", 0.0), ("learning_rate", 2.0), ("num_epochs", 0), ("num_epochs", 1.5),
        ("per_device_batch_size", 0), ("gradient_accumulation_steps", True), ("warmup_ratio", 1.0),
        ("warmup_ratio", -0.1), ("lr_scheduler", "exponential"), ("weight_decay", -1), ("max_grad_norm", -1),
        ("lora_r", 0), ("lora_alpha", 0), ("lora_dropout", 1.0), ("lora_target", ""), ("lora_target", "(unclosed"),
        ("max_length", 0), ("seed", -1), ("max_steps", 0), ("gradient_checkpointing", "yes"), ("logging_steps", 0),
    ],
)
def test_bad_values_name_the_parameter_and_value(param, value):
    with pytest.raises(ValueError, match=re.escape(param)) as info:
        TrainHyperparameters(**{param: value})
    assert repr(value) in str(info.value)


def test_dict_round_trip_and_unknown_keys():
    hp = TrainHyperparameters(beta=0.2, max_steps=10, lora_r=16)
    assert TrainHyperparameters.from_dict(hp.to_dict()) == hp
    assert TrainHyperparameters.from_dict({"beta": 0.3}) == TrainHyperparameters(beta=0.3)
    with pytest.raises(ValueError, match="'rpo_alpha'"):
        TrainHyperparameters.from_dict({"rpo_alpha": 0.1})


def test_build_configs_on_cpu(tmp_path):
    hp = TrainHyperparameters(max_steps=7, warmup_ratio=0.1, gradient_checkpointing=True)
    args, lora = build_configs(hp, tmp_path, device="cpu", checkpoint_every=5)
    assert args.use_cpu and not args.bf16 and not args.fp16
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.1] and args.beta == 0.1
    assert args.max_length is None and not args.precompute_ref_log_probs and not args.disable_dropout
    assert args.save_strategy == "steps" and args.save_steps == 5 and not args.save_only_model
    assert args.max_steps == 7 and args.warmup_steps == 0.1 and args.learning_rate == 5e-5
    assert args.gradient_checkpointing and args.report_to == [] and args.output_dir == str(tmp_path)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (128, 256, 0.05, LM_LINEAR_TARGET)


def test_effective_batch_size_sets_the_accumulation_per_process_count(tmp_path):
    hp = TrainHyperparameters(effective_batch_size=64, per_device_batch_size=2)
    assert [hp.accumulation(n) for n in (1, 2, 8, 64)] == [32, 16, 4, 1]
    args, _ = build_configs(hp, tmp_path, device="cpu", checkpoint_every=None, num_processes=8)
    assert args.gradient_accumulation_steps == 4
    args, _ = build_configs(TrainHyperparameters(gradient_accumulation_steps=3), tmp_path, device="cpu", checkpoint_every=None, num_processes=8)
    assert args.gradient_accumulation_steps == 3
    with pytest.raises(ValueError, match="not both"):
        TrainHyperparameters(effective_batch_size=64, gradient_accumulation_steps=2)


def test_sft_alone_is_the_nll_term_without_dpo(tmp_path):
    args, _ = build_configs(TrainHyperparameters(dpo_weight=0.0, nll_weight=1.0), tmp_path, device="cpu", checkpoint_every=None)
    assert (args.loss_type, args.loss_weights) == (["sft"], [1.0])
    with pytest.raises(ValueError, match="nothing to train"):
        TrainHyperparameters(dpo_weight=0.0, nll_weight=0.0)


def test_build_configs_without_checkpoints_or_nll(tmp_path):
    args, _ = build_configs(TrainHyperparameters(nll_weight=0.0), tmp_path, device="cpu", checkpoint_every=None)
    assert args.save_strategy == "no" and args.loss_type == ["sigmoid"] and args.max_steps == -1
    assert args.num_train_epochs == 3 and not args.gradient_checkpointing
    with pytest.raises(ValueError, match="checkpoint_every"):
        build_configs(TrainHyperparameters(), tmp_path, device="cpu", checkpoint_every=0)
    with pytest.raises(ValueError, match="device"):
        build_configs(TrainHyperparameters(), tmp_path, device="mps", checkpoint_every=None)
