"""The fast DPO step (trainer.fast) against TRL's plain one: same loss, same LoRA gradients, same
reference log-probs, on real tiny models with 1 and 4 images per prompt (CPU, fp32, LoRA dropout 0).

Resuming a fast-path training from a checkpoint is test_train.py's resume test: the fast path and the
precomputed reference are the defaults there (it asserts so).
"""

from __future__ import annotations

import pytest
import torch
from transformers import PrinterCallback
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from tests.trainer.conftest import write_export
from trainer.config import TrainHyperparameters, build_configs
from trainer.data import load_pairs
from trainer.fast import REF_COLUMNS, FastDPOTrainer, PackedPreferenceCollator
from workers.models import load_model

FAMILIES = ("tiny-llava", "tiny-qwen2.5-vl")
PAIRS = 3  # answers of different lengths: padding in both layouts


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-exports")
    return {n: write_export(root / f"images-{n}", num_pairs=PAIRS, images_per_prompt=n, seed=n) for n in (1, 4)}


def _trainer(family, export, out, settings, *, precompute):
    handle = load_model(family, settings)
    hp = TrainHyperparameters(lora_r=4, lora_alpha=8, lora_dropout=0.0, max_steps=1, warmup_ratio=0.0,
                              per_device_batch_size=PAIRS)
    args, lora = build_configs(hp, out, device="cpu", checkpoint_every=None)
    dataset = load_pairs(export, cache_dir=out / "cache")
    trainer = FastDPOTrainer(model=handle.model, args=args, train_dataset=dataset, processing_class=handle.processor,
                             peft_config=lora, fast_path=True, precompute_ref_logps=precompute)
    trainer.remove_callback(PrinterCallback)
    # LoRA B starts at zero (policy == reference, no gradient on A): move every adapter weight.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    return trainer, handle.processor, dataset


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    trainer._total_train_tokens = 0  # TRL's num_tokens metric is cumulative
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    return loss.detach(), grads, logged


@pytest.mark.parametrize("images", [1, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_loss_and_lora_gradients_equal_the_plain_path(family, images, exports, tiny_settings, tmp_path):
    trainer, processor, dataset = _trainer(family, exports[images], tmp_path, tiny_settings, precompute=False)
    assert trainer.fast_path
    examples = [dataset[i] for i in range(PAIRS)]
    plain = DataCollatorForVisionPreference(processor=processor)([dict(e) for e in examples])
    packed = PackedPreferenceCollator(processor=processor)([dict(e) for e in examples])
    # One sequence per pair, shorter than the two plain ones together; the images processed once.
    assert packed["packed_input_ids"].shape[0] == PAIRS and plain["input_ids"].shape[0] == 2 * PAIRS
    assert packed["packed_pixel_values"].shape[0] * 2 == plain["pixel_values"].shape[0]
    assert packed["packed_input_ids"].shape[1] < 2 * plain["input_ids"].shape[1]

    plain_loss, plain_grads, plain_logs = _loss_and_grads(trainer, plain)
    fast_loss, fast_grads, fast_logs = _loss_and_grads(trainer, packed)
    assert plain_loss.item() > 0 and torch.isfinite(fast_loss)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == fast_grads.keys()
    assert any("lora_A" in n for n in plain_grads) and any("lora_B" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Every metric TRL logs (log-probs, rewards, entropy, token counts, ...) is the same too.
    assert fast_logs.keys() == plain_logs.keys()
    for key, value in plain_logs.items():
        assert fast_logs[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_reference_equals_the_on_the_fly_one(family, exports, tiny_settings, tmp_path):
    trainer, processor, _ = _trainer(family, exports[4], tmp_path, tiny_settings, precompute=True)
    assert trainer.precompute_ref_logps
    dataset = trainer.train_dataset
    assert all(c in dataset.column_names for c in REF_COLUMNS)
    # Stored with the training: the pair set's datasets cache under its output folder.
    assert any((tmp_path / "cache").rglob("cache-*.arrow"))
    examples = [dataset[i] for i in range(PAIRS)]
    plain = trainer._prepare_inputs(DataCollatorForVisionPreference(processor=processor)([dict(e) for e in examples]))
    on_the_fly = trainer.compute_ref_log_probs(trainer.model, plain)  # TRL's own, adapter disabled
    for column, expected in zip(REF_COLUMNS, on_the_fly, strict=True):
        torch.testing.assert_close(torch.tensor(dataset[column][:PAIRS]), expected.float(), rtol=1e-5, atol=1e-4)

    # Training on them: the loss of TRL's on-the-fly reference step, to float tolerance.
    packed = PackedPreferenceCollator(processor=processor)([dict(e) for e in examples])
    assert set(REF_COLUMNS) <= packed.keys()
    stored_loss, _, _ = _loss_and_grads(trainer, packed)
    trainer.precompute_ref_logps = False
    plain_batch = DataCollatorForVisionPreference(processor=processor)([dict(e) for e in examples])
    fly_loss, _, _ = _loss_and_grads(trainer, plain_batch)
    torch.testing.assert_close(stored_loss, fly_loss, rtol=1e-5, atol=1e-6)
