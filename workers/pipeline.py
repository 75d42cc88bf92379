"""The MIA-DPO pipeline as composable steps: shard -> merge -> export (DESIGN 2.2-2.6).

A pair set is `num` recipes split into shards of `shard_size`. A shard renders its recipes, generates
candidates, gets each candidate's attention (recorded during generation with the `hf` backend, a
separate probe pass otherwise), and judges it; its output is one JSONL record per prompt. The merge
reads the shard records twice (fences from the statistics, then filtering) and exports the surviving
pairs. Nothing here knows about HTTP or Redis: `miadpo pairs` runs the steps in one process, the RQ
tasks run the same steps as separate jobs.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from core.dataset import Sample
from core.store import atomic_writer
from workers.attention import ProbeResult, probe, recipe_ratio
from workers.augment import FORMATS, AugmentMix, Recipe, make_recipes
from workers.export import ExportPair, ShardWriter, write_card
from workers.generate import Candidate, GenerationBackend, GenerationConfig, PromptInput
from workers.postselect import (
    FILTERS,
    Fences,
    PairStats,
    PostSelectionConfig,
    fit_fences,
    normalised_edit_distance,
)
from workers.render import Loader, perturb_target, render_recipe, target_box
from workers.select import SelectionConfig, select

NOISE_FORMATS: tuple[str, ...] = ("grid", "pic_in_pic")  # what the official code perturbs


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides a pair set's content; the same config and seed give the same pairs."""

    model: str = field(default="tiny-llava", metadata={"help": "Built-in tiny model, local path or cached hub id."})
    num: int = field(default=100, metadata={"help": "Augmented prompts to make."})
    formats: tuple[str, ...] = field(default=FORMATS, metadata={"help": "Formats to draw from."})
    mix: AugmentMix = field(default_factory=AugmentMix, metadata={"help": "Format and image-count proportions."})
    seed: int = field(default=0, metadata={"help": "The one seed of the pair set."})
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    post_selection: PostSelectionConfig = field(default_factory=PostSelectionConfig)
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "LM layers for attention (default: middle)."})
    backend: str = field(default="hf", metadata={"help": "hf | vllm | openai."})
    base_url: str | None = field(default=None, metadata={"help": "openai backend: the server's /v1 URL."})
    shard_size: int = field(default=200, metadata={"help": "Prompts per shard job."})
    noise_std: float = field(
        default=0.0,
        metadata={"help": "Gaussian noise (std, 0..255 pixel units) on the target region of the images generation sees; 0: none."},
    )
    noise_formats: tuple[str, ...] = field(
        default=NOISE_FORMATS, metadata={"help": "Formats whose prompts get the noise (official code: grid, pic-in-pic)."}
    )

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError(f"num must be >= 1, got {self.num}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.backend not in ("hf", "vllm", "openai"):
            raise ValueError(f"backend must be hf, vllm or openai, got {self.backend!r}")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url")
        unknown = set(self.formats) - set(FORMATS)
        if unknown or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(self.formats)}")
        if not 0 <= self.noise_std <= 255:  # also refuses nan
            raise ValueError(f"noise_std must be in [0, 255], got {self.noise_std}")
        if set(self.noise_formats) - set(FORMATS) or len(set(self.noise_formats)) != len(self.noise_formats):
            raise ValueError(f"noise_formats must be distinct formats of {FORMATS}, got {list(self.noise_formats)}")

    @property
    def effective_mix(self) -> AugmentMix:
        return self.mix.only(self.formats)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mix"] = self.mix.to_dict()
        d["formats"] = list(self.formats)
        d["noise_formats"] = list(self.noise_formats)
        d["selection"] = {"preset": self.selection.preset, "thresholds": {f: dict(t) for f, t in self.selection.thresholds.items()}}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PipelineConfig:
        d = dict(d)
        sel = d.pop("selection", {}) or {}
        thresholds = {f: {int(k): float(v) for k, v in t.items()} for f, t in (sel.get("thresholds") or {}).items()}
        return cls(
            **{k: v for k, v in d.items() if k not in ("mix", "generation", "post_selection", "formats", "layers", "noise_formats")},
            formats=tuple(d.get("formats", FORMATS)),
            noise_formats=tuple(d.get("noise_formats", NOISE_FORMATS)),
            mix=AugmentMix.from_dict(d["mix"]) if d.get("mix") else AugmentMix(),
            generation=GenerationConfig(**(d.get("generation") or {})),
            selection=SelectionConfig(preset=sel.get("preset", "paper"), thresholds=thresholds),
            post_selection=PostSelectionConfig(**(d.get("post_selection") or {})),
            layers=tuple(d["layers"]) if d.get("layers") else None,
        )


def shard_ranges(num: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) recipe indices of each shard."""
    return [(s, min(s + shard_size, num)) for s in range(0, num, shard_size)]


def _image_size(images: Sequence[Any]) -> tuple[int, int]:
    return images[0].size


def _candidate_probes(handle: Any, prompts: Sequence[PromptInput], cands: list[list[Candidate]], layers: Any, batch_size: int) -> list[list[ProbeResult]]:
    """Probe results for every candidate: recorded ones as they are, the rest from one probe pass."""
    tokenizer = handle.processor.tokenizer
    # An answer that spells out an image placeholder (e.g. the text "<image>") must not become image
    # features in the probe: those tokens are dropped from the probed ids.
    placeholders = set(handle.family.placeholder_token_ids(handle.processor))
    todo: list[tuple[int, int]] = []
    out: list[list[ProbeResult | None]] = [[c.probe for c in row] for row in cands]
    for i, row in enumerate(cands):
        for j, c in enumerate(row):
            if c.probe is None:
                if not c.token_ids and c.text:  # text-only backends: re-tokenise the answer
                    c.token_ids = tokenizer(c.text, add_special_tokens=False)["input_ids"]
                c.token_ids = [t for t in c.token_ids if t not in placeholders]
                todo.append((i, j))
    if todo:
        results = probe(handle, [prompts[i] for i, _ in todo], [cands[i][j].token_ids for i, j in todo], layers=layers, batch_size=batch_size)
        for (i, j), r in zip(todo, results, strict=True):
            out[i][j] = r
    return out  # type: ignore[return-value]


def _generation_images(recipe: Recipe, config: PipelineConfig, load: Loader) -> list[Image.Image]:
    """The images generation and the attention pass see: the render, with noise on the target when asked.

    Only here: the export renders the recipe again, clean. The model is trained on the real images; the
    noise only provokes the hallucinated answers that become the rejected side of the pairs.
    """
    images = render_recipe(recipe, load)
    if config.noise_std > 0 and recipe.format in config.noise_formats:
        images = perturb_target(images, recipe, config.noise_std, config.seed)
    return images


def process_shard(
    samples: Sequence[Sample],
    config: PipelineConfig,
    start: int,
    stop: int,
    *,
    handle: Any,
    backend: GenerationBackend,
    load: Loader,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """Render, generate, measure attention and judge recipes `start .. stop-1`.

    Args:
        samples: the dataset's samples.
        config: the pair set's configuration.
        start, stop: recipe index range of this shard.
        handle: the loaded HF model (for the attention pass and token counts).
        backend: the generation backend.
        load: image loader for the renderer (workers.render.store_loader).
        on_batch: called with the number of prompts finished after each batch (progress, cancel checks).

    Returns:
        One JSON-able record per prompt: the recipe, every candidate with its ratio, perplexity and
        verdict, the rejected index and the pair's statistics (None when there is no pair).
    """
    recipes = make_recipes(samples, num=stop - start, seed=config.seed, mix=config.effective_mix, start=start)
    tokenizer = handle.processor.tokenizer
    gen = config.generation
    records: list[dict] = []
    for b in range(0, len(recipes), gen.batch_size):
        batch = recipes[b : b + gen.batch_size]
        prompts = [PromptInput(r.uid, r.prompt, _generation_images(r, config, load)) for r in batch]
        cands = backend.generate(prompts, replace(gen, seed=gen.seed + config.seed * 1_000_003 + start + b))
        probes = _candidate_probes(handle, prompts, cands, config.layers, batch_size=gen.batch_size)
        for recipe, prompt, row, row_probes in zip(batch, prompts, cands, probes, strict=True):
            records.append(_judge(recipe, prompt, row, row_probes, config, tokenizer))
        if on_batch is not None:
            on_batch(len(batch))
    return records


def _judge(recipe: Recipe, prompt: PromptInput, cands: list[Candidate], probes: list[ProbeResult], config: PipelineConfig, tokenizer: Any) -> dict:
    box = target_box(recipe)
    size = _image_size(prompt.images) if box is not None else None
    ratios: list[float | None] = []
    for p in probes:
        r = recipe_ratio(p, recipe.format, recipe.target_index, size, box)
        ratios.append(None if math.isnan(r) else r)
    threshold = config.selection.threshold(recipe.format, recipe.n_images)
    verdicts, rejected = select(recipe.answer, [c.text for c in cands], ratios, threshold)
    stats = None
    if rejected is not None:
        chosen_tokens = len(tokenizer(recipe.answer, add_special_tokens=False)["input_ids"])
        rej = cands[rejected]
        stats = asdict(
            PairStats(
                perplexity=probes[rejected].perplexity,
                length_ratio=len(rej.token_ids) / max(chosen_tokens, 1),
                edit_distance=normalised_edit_distance(recipe.answer, rej.text),
            )
        )
    return {
        "uid": recipe.uid,
        "recipe": recipe.to_dict(),
        "threshold": threshold,
        "candidates": [
            {
                "text": c.text,
                "num_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
                "ratio": ratio,
                "perplexity": None if math.isnan(p.perplexity) else p.perplexity,  # nan: empty answer
                "hallucinated": v.hallucinated,
                "reason": v.reason,
            }
            for c, p, ratio, v in zip(cands, probes, ratios, verdicts, strict=True)
        ],
        "rejected": rejected,
        "stats": stats,
    }


def write_records(path: Path, records: Iterable[dict]) -> None:
    """One shard's records as JSONL, atomically (a retried shard overwrites, never half-writes)."""
    with atomic_writer(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False, allow_nan=True) + "\n")


def read_records(paths: Iterable[Path]) -> Iterator[dict]:
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


@dataclass
class MergeResult:
    """What the merge learned: counts for the record and the card, and the fitted fences."""

    counts: dict[str, Any]
    fences: Fences
    per_format: dict[str, dict[int, int]]
    num_pairs: int


def _outcome(rec: dict, fences: Fences) -> str:
    """"exported", "no_pair" (selection found no rejected answer) or the post-selection filter that removed it."""
    if rec["stats"] is None:
        return "no_pair"
    return fences.reason(PairStats(**rec["stats"])) or "exported"


def _explanation(rec: dict, outcome: str) -> dict:
    recipe = rec["recipe"]
    return {
        "uid": rec["uid"],
        "format": recipe["format"],
        "n_images": len(recipe["images"]),
        "target_index": recipe["target_index"],
        "threshold": rec["threshold"],
        "outcome": outcome,
        "rejected": rec["rejected"],
        "stats": rec["stats"],
        "candidates": rec["candidates"],
    }


def _add_pair(writer: ShardWriter, rec: dict, s: PairStats, load: Loader) -> None:
    recipe = Recipe.from_dict(rec["recipe"])
    rejected = rec["candidates"][rec["rejected"]]
    # The clean render, even when generation saw noise (`noise_std`): the pairs teach the real images.
    writer.add(
        ExportPair(
            uid=recipe.uid, source_id=recipe.sample_id, format=recipe.format, target_index=recipe.target_index,
            prompt=recipe.prompt, images=render_recipe(recipe, load), chosen=recipe.answer, rejected=rejected["text"],
            attention_ratio=rejected["ratio"], perplexity=s.perplexity, length_ratio=s.length_ratio, edit_distance=s.edit_distance,
        )
    )


def merge_and_export(
    shard_paths: Sequence[Path],
    config: PipelineConfig,
    out_dir: Path,
    load: Loader,
    rows_per_shard: int = 500,
    on_stage: Callable[[str], None] | None = None,
) -> MergeResult:
    """Post-select over the whole pair set and export the survivors with their dataset card.

    Args:
        shard_paths: every shard's record file (all of them: fences need the whole set).
        config: the pair set's configuration.
        out_dir: export folder (data/*.parquet, README.md, histograms/).
        load: image loader; the pair images are rendered again from their recipes.
        rows_per_shard: rows per parquet shard.
        on_stage: called with "select" before the statistics pass and "export" before the export pass.

    Returns:
        Counts, fences and per-format pair counts.
    """
    if on_stage is not None:
        on_stage("select")
    # Pass 1: the statistics of every pair (a few floats each) and the counts.
    stats: list[PairStats] = []
    ratios: dict[str, list[float]] = defaultdict(list)
    counts: Counter[str] = Counter()
    for rec in read_records(shard_paths):
        fmt = rec["recipe"]["format"]
        counts["prompts"] += 1
        counts["candidates"] += len(rec["candidates"])
        counts["hallucinated_candidates"] += sum(c["hallucinated"] for c in rec["candidates"])
        if any(c["hallucinated"] for c in rec["candidates"]):
            counts["hallucinated"] += 1
        else:
            counts["not_hallucinated"] += 1
        ratios[f"attention_ratio_{fmt}"].extend(c["ratio"] for c in rec["candidates"] if c["ratio"] is not None)
        if rec["stats"] is not None:
            stats.append(PairStats(**rec["stats"]))
    fences = fit_fences(stats, config.post_selection)

    if on_stage is not None:
        on_stage("export")
    # Pass 2: filter, render and write the survivors.
    removed: Counter[str] = Counter({name: 0 for name in FILTERS})
    per_format: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    writer = ShardWriter(out_dir, rows_per_shard=rows_per_shard)
    kept_stats: list[PairStats] = []
    # Why each prompt has a pair or not: every candidate's ratio, perplexity and verdict, and the
    # post-selection outcome; shipped with the export (candidates.jsonl) and described in the card.
    with atomic_writer(Path(out_dir) / "candidates.jsonl", "w") as explain:
        for rec in read_records(shard_paths):
            outcome = _outcome(rec, fences)
            explain.write(json.dumps(_explanation(rec, outcome), ensure_ascii=False) + "\n")
            if outcome != "exported":
                if outcome in removed:
                    removed[outcome] += 1
                continue
            s = PairStats(**rec["stats"])
            _add_pair(writer, rec, s, load)
            per_format[rec["recipe"]["format"]][len(rec["recipe"]["images"])] += 1
            kept_stats.append(s)
    writer.close()
    summary = {
        "prompts": counts["prompts"],
        "candidates": counts["candidates"],
        "hallucinated": counts["hallucinated"],
        "not_hallucinated": counts["not_hallucinated"],
        "hallucinated_candidates": counts["hallucinated_candidates"],
        "selected_pairs": len(stats),
        "removed": dict(removed),
        "pairs": writer.num_rows,
    }
    histograms: dict[str, list[float]] = dict(sorted(ratios.items()))
    histograms["perplexity"] = [s.perplexity for s in stats]
    histograms["length_ratio"] = [s.length_ratio for s in stats]
    histograms["edit_distance"] = [s.edit_distance for s in stats]
    write_card(
        out_dir,
        title=f"MIA-DPO pairs ({config.model}, seed {config.seed})",
        counts={k: v for k, v in summary.items() if k != "removed"},
        per_format={f: dict(c) for f, c in per_format.items()},
        removed=dict(removed),
        fences=fences.to_dict(),
        histograms=histograms,
        config=config.to_dict(),
        seed=config.seed,
    )
    return MergeResult(counts=summary, fences=fences, per_format={f: dict(c) for f, c in per_format.items()}, num_pairs=writer.num_rows)


def make_backend(config: PipelineConfig, handle: Any, *, api_key: str | None = None) -> GenerationBackend:
    """The configured generation backend (vllm and openai are imported only when chosen); `api_key` is
    the bearer key of the openai backend's server, if it wants one."""
    if config.backend == "hf":
        from workers.backends.hf import HFBackend

        return HFBackend(handle, record_attention=True, layers=config.layers)
    if config.backend == "openai":
        from workers.backends.openai import OpenAIBackend

        return OpenAIBackend(base_url=config.base_url or "", model=config.model, api_key=api_key)
    from workers.backends.vllm import VLLMBackend

    return VLLMBackend(config.model)
