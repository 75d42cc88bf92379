"""The `miadpo` command line: one entry point, one subcommand per job.

Heavy imports (torch, transformers, PIL pipelines) happen inside the subcommands, so `miadpo --help`
is instant and the API process does not pay for what it does not use.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from core.errors import MiadpoError
from core.runtime import configure_libraries
from core.settings import get_settings


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_sample_data(args: argparse.Namespace) -> int:
    from workers.sample_data import write_sample_data

    path = write_sample_data(Path(args.dir), num_samples=args.num, seed=args.seed, style=args.style)
    print(f"wrote {args.num} samples: {path}")
    return 0


def local_dataset_id(dataset: Path) -> str:
    """The id a local dataset gets in the store under the data dir (the same path, the same id)."""
    return "local-" + hashlib.sha256(str(dataset.resolve()).encode()).hexdigest()[:12]


def ingest_local(dataset: Path, quiet: bool = False) -> tuple[object, str, object]:
    """Ingest a local dataset into the store under the data dir; return (store, dataset_id, manifest)."""
    from core.store import ArtifactStore
    from workers.ingest import IngestLimits, ingest

    settings = get_settings()
    store = ArtifactStore(settings.data_dir)
    dataset_id = local_dataset_id(dataset)
    manifest = ingest(dataset, store, dataset_id, limits=IngestLimits.from_settings(settings))
    if not quiet:
        print(
            f"ingested {dataset}: {manifest.num_samples} samples, {manifest.num_images} images, "
            f"{len(manifest.problems)} problems"
        )
        for p in manifest.problems[:10]:
            print(f"  row {p.row} id={p.id}: {p.code}: {p.reason}")
        if len(manifest.problems) > 10:
            print(f"  ... {len(manifest.problems) - 10} more")
    return store, dataset_id, manifest


def cmd_augment(args: argparse.Namespace) -> int:
    from core.dataset import read_samples
    from workers.augment import AugmentMix, make_recipes
    from workers.render import encode_png, open_image, render_recipe

    store, dataset_id, _ = ingest_local(Path(args.dataset))
    samples = read_samples(store, dataset_id)  # type: ignore[arg-type]
    mix = AugmentMix().only(_csv(args.formats))
    recipes = make_recipes(samples, num=args.num, seed=args.seed, mix=mix)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    def load(ref: str):
        return open_image(store.image_path(ref))  # type: ignore[attr-defined]

    started = time.perf_counter()
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for recipe in recipes:
            names = []
            for j, img in enumerate(render_recipe(recipe, load)):
                name = f"images/{recipe.uid}_{j}.png"
                (out / name).write_bytes(encode_png(img))
                names.append(name)
            row = {
                "uid": recipe.uid,
                "format": recipe.format,
                "n_images": recipe.n_images,
                "target_index": recipe.target_index,
                "sample_id": recipe.sample_id,
                "source_ids": [im.sample_id for im in recipe.images],
                "prompt": recipe.prompt,
                "answer": recipe.answer,
                "images": names,
                "seed": recipe.seed,
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    elapsed = time.perf_counter() - started
    counts: dict[str, int] = {}
    for r in recipes:
        counts[f"{r.format}/{r.n_images}"] = counts.get(f"{r.format}/{r.n_images}", 0) + 1
    print(f"rendered {len(recipes)} samples in {elapsed:.1f}s into {out}")
    for key in sorted(counts):
        print(f"  {key:<14} {counts[key]}")
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    """The whole pipeline in one process: augment -> generate -> attention -> select -> postselect -> export."""
    from app.schemas import PairSetCreate
    from core.dataset import read_samples
    from workers.models import load_model
    from workers.pipeline import (
        make_backend,
        merge_and_export,
        model_fit,
        process_shard,
        shard_ranges,
        write_records,
    )
    from workers.render import store_loader
    from workers.tasks import pipeline_config

    generation: dict = {
        "max_new_tokens": args.max_new_tokens,
        "num_candidates": args.num_candidates,
        "temperature": args.temperature,
        "batch_size": args.batch_size,
        "backend": args.backend,
        "endpoint": args.endpoint,
    }
    if args.noise_std is not None:
        generation["noise"] = {f: {"std": args.noise_std} for f in _csv(args.noise_formats)}
    selection: dict = {"attention_rows": args.attention_rows} if args.attention_rows else {}
    post = {"k": args.tukey_k} if args.tukey_k is not None else {}
    # The same request the API takes, so the preset and every default resolve exactly as for a pair set.
    request = PairSetCreate.model_validate(
        {
            "dataset_id": local_dataset_id(Path(args.dataset)),
            "model": args.model,
            "preset": args.preset,
            "augmentation": {"num": args.num, "formats": _csv(args.formats)},
            "generation": generation,
            "seed": args.seed,
            "shard_size": args.shard_size,
            **({"selection": selection} if selection else {}),
            **({"post_selection": post} if post else {}),
        }
    )
    config = pipeline_config(request.model_dump(mode="json"), get_settings())
    store, dataset_id, _ = ingest_local(Path(args.dataset))  # after the checks: a bad flag costs nothing
    samples = read_samples(store, dataset_id)  # type: ignore[arg-type]
    handle = load_model(config.model)
    backend = make_backend(config, handle)
    load = store_loader(store)  # type: ignore[arg-type]
    out = Path(args.out)
    shard_paths = []
    started = time.perf_counter()
    done = 0
    for i, (start, stop) in enumerate(shard_ranges(config.num, config.shard_size)):
        records = process_shard(samples, config, start, stop, handle=handle, backend=backend, load=load)
        path = out / "shards" / f"{i:05d}.jsonl"
        write_records(path, records)
        shard_paths.append(path)
        done += len(records)
        print(f"shard {i}: {done}/{config.num} prompts ({time.perf_counter() - started:.1f}s)", flush=True)
    backend.close()
    result = merge_and_export(shard_paths, config, out / "export", load, model_fit(handle))
    c = result.counts
    print(
        f"prompts {c['prompts']} (hallucinated {c['hallucinated']}, not {c['not_hallucinated']}), "
        f"candidates {c['candidates']}, pairs selected {c['selected_pairs']}, removed {c['removed']}, pairs {c['pairs']}"
    )
    print(f"export: {out / 'export'} (README.md, data/*.parquet)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job over the HTTP API on the bundled sample data, ending with a downloaded adapter."""
    from cli.demo import demo_request, run_demo

    request = demo_request(model=args.model, num=args.num, max_steps=args.max_steps)
    return run_demo(Path(args.out), url=args.url, api_key=args.api_key, request=request)


def cmd_api(args: argparse.Namespace) -> int:
    from cli.services import run_api

    return run_api(get_settings(), host=args.host, port=args.port)


def cmd_worker(args: argparse.Namespace) -> int:
    from cli.services import run_worker

    return run_worker(get_settings(), _csv(args.queues), burst=args.burst)


def cmd_trainer(args: argparse.Namespace) -> int:
    from cli.services import run_trainer

    return run_trainer(get_settings(), burst=args.burst)


def cmd_up(args: argparse.Namespace) -> int:
    from cli.services import run_up

    data_dir = Path(args.data_dir) if args.data_dir else None
    return run_up(get_settings(), host=args.host, port=args.port, data_dir=data_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miadpo", description="MIA-DPO: multi-image preference alignment for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-data", help="Write the synthetic shapes VQA dataset (LLaVA format).")
    p.add_argument("dir", help="Output folder.")
    p.add_argument("--num", type=int, default=64, help="Number of images.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--style", choices=("scenes", "single"), default="scenes",
        help="scenes: 1-3 shapes, sentence answers; single: one large shape, one-word colour/shape answers (shapes-llava's data).",
    )  # fmt: skip
    p.set_defaults(func=cmd_sample_data)

    p = sub.add_parser("augment", help="Turn a single-image dataset into rendered multi-image prompts.")
    p.add_argument("--dataset", required=True, help="Archive (.zip/.tar/.tar.gz), folder, .json/.jsonl or .parquet.")
    p.add_argument("--out", required=True, help="Output folder (images/ and prompts.jsonl).")
    p.add_argument("--formats", default="sequence,grid,pic_in_pic", help="Comma list of formats.")
    p.add_argument("--num", type=int, default=100, help="Number of augmented samples.")
    p.add_argument("--seed", type=int, default=0, help="Same seed, same bytes.")
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("pairs", help="Run the whole pipeline in this process and export DPO pairs.")
    p.add_argument("--dataset", required=True, help="Archive, folder, .json/.jsonl or .parquet.")
    p.add_argument("--model", default="tiny-llava", help="tiny-llava, tiny-qwen2.5-vl, a local path or a cached hub id.")
    p.add_argument("--out", required=True, help="Output folder (shards/ and export/).")
    p.add_argument("--num", type=int, default=100, help="Augmented prompts.")
    p.add_argument("--formats", default="sequence,grid,pic_in_pic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--num-candidates", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--preset", default="paper", help="Pipeline preset: paper or official_code (see docs/fidelity.md).")
    p.add_argument("--attention-rows", default=None, help="answer_tokens or producing (default: the preset's).")
    p.add_argument("--tukey-k", type=float, default=None, help="Post-selection fence width (default 1.5).")
    p.add_argument("--backend", default="hf", help="hf, vllm or openai.")
    p.add_argument("--endpoint", default=None, help="openai backend: a server named in MIADPO_GENERATION_ENDPOINTS.")
    p.add_argument("--shard-size", type=int, default=200)
    p.add_argument("--noise-std", type=float, default=None, help="Gaussian noise (std, 0..255) on the target region the model sees (default: the preset's).")
    p.add_argument("--noise-formats", default="grid,pic_in_pic", help="Comma list of formats that get the noise.")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("demo", help="Run the main job on the bundled sample data, through the HTTP API.")
    p.add_argument("--out", default="data/demo", help="Where the demo writes (stack data, sample data, adapter).")
    p.add_argument("--url", default=None, help="Use a running stack at this URL instead of starting one.")
    p.add_argument("--api-key", default=None, help="API key for --url.")
    p.add_argument("--model", default=None, help="Model for the pair set and the training (default: the demo's).")
    p.add_argument("--num", type=int, default=None, help="Augmented prompts (default: the demo's).")
    p.add_argument("--max-steps", type=int, default=None, help="Stop the training after this many steps (default: its epochs).")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("api", help="Serve the HTTP API.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="Run an RQ worker on some queues.")
    p.add_argument("--queues", default="cpu,gpu,train", help="Comma list of cpu, gpu, train.")
    p.add_argument("--burst", action="store_true", help="Quit when the queues are empty.")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("trainer", help="Run the trainer: a worker on the train queue, one training at a time.")
    p.add_argument("--burst", action="store_true", help="Quit when the queue is empty.")
    p.set_defaults(func=cmd_trainer)

    p = sub.add_parser("up", help="The whole stack on this machine: Redis (if needed), API, a worker, the trainer.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", default=None, help="Artifact store root (default: MIADPO_DATA_DIR).")
    p.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_libraries()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MiadpoError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
