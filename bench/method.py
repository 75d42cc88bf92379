"""The paper's Table 1 at toy scale: does MIA-DPO raise multi-image accuracy while single-image accuracy holds?

    python bench/method.py                     shapes-llava on CPU (the README's figures; < 25 minutes on 2 cores)
    python bench/method.py --model tiny-llava --small    a smoke run of the plumbing (random model, minutes)

One process, the project's own stages, nothing else: the sample generator writes a training dataset and a
held-out one (other seed); the base model is evaluated on the held-out one (`workers.evaluate`: multi-image
prompts with question-matched distractors, and the same samples alone); pairs are made on the training
dataset (`workers.pipeline`, `paper` preset); DPO + LoRA trains an adapter (`trainer.train`); the adapter
is evaluated on the same held-out prompts. Two ablations go the same way: pairs whose rejected answer is
any wrong answer, picked without attention (every threshold 1.0), and SFT on the chosen answers alone
(the trainer with only the NLL term). The attention ratio's AUC at telling the base model's confused
answers from its right ones is printed per format for both `attention_rows` settings.

Last line: `multi-image accuracy: base X mia-dpo Y  single-image accuracy: base A mia-dpo B` (percent;
multi-image = the average over the formats).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.runtime import configure_libraries  # noqa: E402

configure_libraries()  # offline and quiet, before transformers is imported

from core.dataset import read_samples  # noqa: E402
from core.settings import Settings  # noqa: E402
from core.store import ArtifactStore  # noqa: E402
from workers.augment import FORMATS, IMAGE_COUNTS  # noqa: E402
from workers.backends.hf import HFBackend  # noqa: E402
from workers.evaluate import EvalConfig, evaluate_shard, summarise  # noqa: E402
from workers.generate import GenerationConfig  # noqa: E402
from workers.ingest import IngestLimits, ingest  # noqa: E402
from workers.models import load_model  # noqa: E402
from workers.pipeline import (  # noqa: E402
    PipelineConfig,
    merge_and_export,
    model_fit,
    process_shard,
    shard_ranges,
    write_records,
)
from workers.render import store_loader  # noqa: E402
from workers.sample_data import write_sample_data  # noqa: E402
from workers.select import SelectionConfig  # noqa: E402

LIMITS = IngestLimits(10**10, 10**6, 200.0, 10**8, 512)
NO_ATTENTION = SelectionConfig(thresholds={f: dict.fromkeys(counts, 1.0) for f, counts in IMAGE_COUNTS.items()})


def _dataset(root: Path, store: ArtifactStore, name: str, num: int, seed: int) -> list[Any]:
    # The `single` style: what shapes-llava was trained on (other seeds than its training data: held out).
    write_sample_data(root / name, num_samples=num, seed=seed, style="single")
    ingest(root / name, store, name, limits=LIMITS)
    return read_samples(store, name)


def _evaluate(model: str, adapter: Path | None, samples: list[Any], config: EvalConfig, load: Any, settings: Settings) -> dict[str, Any]:
    handle = load_model(model, settings, adapter=adapter)
    records = evaluate_shard(samples, config, 0, config.num, handle=handle, backend=HFBackend(handle), load=load)
    return summarise(records)


def _pairs(model: str, samples: list[Any], config: PipelineConfig, load: Any, out: Path, settings: Settings) -> dict[str, Any]:
    handle = load_model(model, settings)
    backend = HFBackend(handle)
    paths = []
    for i, (start, stop) in enumerate(shard_ranges(config.num, config.shard_size)):
        records = process_shard(samples, config, start, stop, handle=handle, backend=backend, load=load)
        paths.append(out / "shards" / f"{i:05d}.jsonl")
        write_records(paths[-1], records)
    return merge_and_export(paths, config, out / "export", load, model_fit(handle)).counts


def _train(model: str, export: Path, out: Path, hp: Any, settings: Settings) -> tuple[Path, dict[str, float]]:
    from trainer.train import run_training

    result = run_training(model=model, export_dir=export, output_dir=out, hp=hp, checkpoint_every=None, resume=False, settings=settings, device="cpu")
    assert result.adapter_dir is not None
    return result.adapter_dir, result.metrics


def _progress(timings: dict[str, float], started: float) -> None:
    name, seconds = list(timings.items())[-1]
    print(f"[{time.perf_counter() - started:6.0f} s] {name}: {seconds:.0f} s", file=sys.stderr, flush=True)


def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:5.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-llava", help="A built-in model, or a model folder.")
    parser.add_argument("--small", action="store_true", help="A smoke run: a handful of prompts, a few steps.")
    parser.add_argument("--train-samples", type=int, default=600, help="Images of the training dataset.")
    parser.add_argument("--eval-samples", type=int, default=300, help="Images of the held-out dataset.")
    parser.add_argument("--pairs", type=int, default=600, help="Prompts the pipeline answers to make pairs.")
    parser.add_argument("--eval", type=int, default=120, help="Held-out multi-image prompts (each sample is also asked alone).")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="Answers are one word (' triangle</s>' is 10 tokens).")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--nll-weight", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8, help="Pairs per optimizer step (per-device batch).")
    parser.add_argument("--json", type=Path, default=None, help="Also write every figure here.")
    args = parser.parse_args()
    if args.small:
        args.train_samples, args.eval_samples, args.pairs, args.eval, args.max_new_tokens = 24, 24, 12, 6, 6
    torch_threads = os.environ.get("MIADPO_BENCH_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))

    from trainer.config import TrainHyperparameters

    started = time.perf_counter()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="miadpo-method-") as tmp:
        root = Path(tmp)
        # --model may name a model folder (e.g. a fresh scripts/train_shapes_model.py --out): its parent is
        # the operator's models dir, its name the model.
        model_path = Path(args.model)
        if model_path.is_dir():
            args.model = model_path.name
        settings = Settings(data_dir=root / "data", models_dir=model_path.parent if model_path.is_dir() else None)
        store = ArtifactStore(root / "store")
        load = store_loader(store)
        train_samples = _dataset(root, store, "train", args.train_samples, seed=101)
        eval_samples = _dataset(root, store, "heldout", args.eval_samples, seed=202)
        eval_config = EvalConfig(model=args.model, num=args.eval, seed=7, max_new_tokens=args.max_new_tokens, batch_size=16)
        hp = TrainHyperparameters(
            learning_rate=args.learning_rate, num_epochs=args.epochs, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
            lora_dropout=0.0, beta=args.beta, nll_weight=args.nll_weight, per_device_batch_size=args.batch_size,
            max_steps=2 if args.small else None, warmup_ratio=0.1, seed=0,
        )  # fmt: skip
        pair_config = PipelineConfig(
            model=args.model, num=args.pairs, seed=11, shard_size=args.pairs,
            generation=GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=16),
        )  # fmt: skip

        t = time.perf_counter()
        results: dict[str, dict[str, Any]] = {"base": _evaluate(args.model, None, eval_samples, eval_config, load, settings)}
        timings["evaluate base"] = time.perf_counter() - t
        _progress(timings, started)
        runs = {
            "mia-dpo": (pair_config, hp),
            "no attention": (replace(pair_config, selection=NO_ATTENTION), hp),
            "sft": (pair_config, replace(hp, dpo_weight=0.0, nll_weight=1.0)),
        }
        counts: dict[str, dict[str, Any]] = {}
        made: dict[str, Path] = {}
        for name, (config, run_hp) in runs.items():
            key = "no attention" if config.selection is NO_ATTENTION else "attention"
            t = time.perf_counter()
            if key not in made:  # the SFT ablation trains on the MIA-DPO pairs' chosen answers
                counts[key] = _pairs(args.model, train_samples, config, load, root / f"pairs-{key}", settings)
                made[key] = root / f"pairs-{key}" / "export"
            timings[f"pairs ({key})"] = timings.get(f"pairs ({key})", 0.0) + time.perf_counter() - t
            _progress(timings, started)
            t = time.perf_counter()
            adapter, metrics = _train(args.model, made[key], root / f"train-{name}", run_hp, settings)
            timings[f"train {name}"] = time.perf_counter() - t
            _progress(timings, started)
            t = time.perf_counter()
            results[name] = _evaluate(args.model, adapter, eval_samples, eval_config, load, settings)
            results[name]["train_metrics"] = metrics
            timings[f"evaluate {name}"] = time.perf_counter() - t
            _progress(timings, started)

    columns = list(results)
    formats = [f for f in FORMATS if f in results["base"]["multi_image"]["per_format"]]
    print(f"\nToy Table 1 ({args.model}; {args.eval} held-out multi-image prompts and their samples alone; accuracy %)")
    print(f"{'':<14}" + "".join(f"{c:>14}" for c in columns))
    print(f"{'single-image':<14}" + "".join(f"{_pct(results[c]['single_image']['accuracy']):>14}" for c in columns))
    for fmt in formats:
        print(f"{fmt:<14}" + "".join(f"{_pct(results[c]['multi_image']['per_format'][fmt]['accuracy']):>14}" for c in columns))
    print(f"{'average':<14}" + "".join(f"{_pct(results[c]['multi_image']['format_average']):>14}" for c in columns))
    print(f"{'confused rate':<14}" + "".join(f"{_pct(results[c]['multi_image']['confused_rate']):>14}" for c in columns))
    for key, c in counts.items():
        print(f"pairs ({key}): {c['pairs']} of {c['prompts']} prompts (hallucinated {c['hallucinated']}, removed {c['removed']})")
    print("\nAttention ratio, base model: AUC of right answers over confused ones")
    print(f"{'format':<14}{'answer_tokens':>15}{'producing':>12}")
    for fmt, by_rows in results["base"]["attention_auc"].items():
        print(f"{fmt:<14}{_auc(by_rows.get('answer_tokens')):>15}{_auc(by_rows.get('producing')):>12}")
    print("\nTime: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "counts": counts, "timings": timings}, indent=1, default=str))
    base, mia = results["base"], results["mia-dpo"]
    print(
        f"multi-image accuracy: base {_pct(base['multi_image']['format_average']).strip()} "
        f"mia-dpo {_pct(mia['multi_image']['format_average']).strip()}  "
        f"single-image accuracy: base {_pct(base['single_image']['accuracy']).strip()} "
        f"mia-dpo {_pct(mia['single_image']['accuracy']).strip()}"
    )
    return 0


def _auc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
