"""The MIA-DPO pipeline as composable steps: shard -> merge -> export (DESIGN 2.2-2.6).

A pair set is `num` recipes split into shards of `shard_size`. A shard renders its recipes, generates
candidates, gets each candidate's attention (recorded during generation with the `hf` backend, a
separate probe pass otherwise), and judges it; its output is one JSONL record per prompt. The merge
reads the shard records twice (fences from the statistics, then filtering) and exports the surviving
pairs. Nothing here knows about HTTP or Redis: `miadpo pairs` runs the steps in one process, the RQ
tasks run the same steps as separate jobs.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from core.dataset import Sample
from core.prompts import IndexWriter, iter_records
from core.store import atomic_writer
from workers.attention import ROWS, ProbeResult, probe, recipe_ratio
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
from workers.render import NOISE_REGIONS, Loader, perturb_target, render_recipe, target_box
from workers.select import PERPLEXITY_GATE, SelectionConfig, select

Fit = Callable[[list[Image.Image]], tuple[list[Image.Image], list[tuple[int, int]]]]


@dataclass(frozen=True)
class NoiseSpec:
    """Gaussian noise on what generation sees for one format (`workers.render.perturb_target`)."""

    std: float = field(metadata={"help": "Standard deviation in pixel units (0..255)."})
    region: str = field(default="target", metadata={"help": "target (cell, inset, image) or image (the whole collage)."})

    def __post_init__(self) -> None:
        if not 0 <= self.std <= 255:  # also refuses nan
            raise ValueError(f"noise std must be in [0, 255], got {self.std}")
        if self.region not in NOISE_REGIONS:
            raise ValueError(f"noise region must be one of {NOISE_REGIONS}, got {self.region!r}")


# Pipeline presets (the `preset` of a pair set): the values a preset gives to the settings a request does
# not set itself, by dotted path into the request. The threshold table is the preset's own (`select.PRESETS`).
# `paper` is the paper's method as this project runs it by default; `official_code` the released scripts:
# strict `<` for grid and pic-in-pic, the official noise (grid: std 225 on the target cell; pic-in-pic:
# std 49 on the whole image) and its `ppl > 1.1` gate in place of the Tukey fences it does not have.
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        # The rows producing the answer's tokens: they tell a wrong-image answer from a right one better than
        # the official rows on shapes-llava's held-out evaluations (docs/fidelity.md, "query rows").
        "selection.attention_rows": "producing",
        "selection.comparison": {"sequence": "<=", "grid": "<=", "pic_in_pic": "<="},
        "selection.perplexity_gate": None,
        "post_selection.perplexity": True,
        "post_selection.length_ratio": True,
        "post_selection.edit_distance": True,
        "generation.noise": {},
    },
    "official_code": {
        "selection.attention_rows": "answer_tokens",
        "selection.comparison": {"sequence": "<=", "grid": "<", "pic_in_pic": "<"},
        "selection.perplexity_gate": 1.1,
        "post_selection.perplexity": False,
        "post_selection.length_ratio": False,
        "post_selection.edit_distance": False,
        "generation.noise": {"grid": {"std": 225.0, "region": "target"}, "pic_in_pic": {"std": 49.0, "region": "image"}},
    },
}


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides a pair set's content; the same config and seed give the same pairs."""

    model: str = field(
        default="tiny-llava", metadata={"help": "Built-in model, folder name under MIADPO_MODELS_DIR or cached hub id."}
    )
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
    endpoint: str | None = field(default=None, metadata={"help": "openai backend: the server's name, as messages show it."})
    shard_size: int = field(default=200, metadata={"help": "Prompts per shard job."})
    noise: Mapping[str, NoiseSpec] = field(
        default_factory=dict,
        metadata={"help": "Per format, Gaussian noise on the images generation sees (the export keeps them clean); none by default."},
    )
    preset: str = field(default="paper", metadata={"help": "The pipeline preset the values came from (paper, official_code)."})

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
        if set(self.noise) - set(FORMATS):
            raise ValueError(f"noise: formats must be among {FORMATS}, got {sorted(self.noise)}")

    @property
    def effective_mix(self) -> AugmentMix:
        return self.mix.only(self.formats)

    def to_dict(self) -> dict:
        """Every effective value (what the dataset card records)."""
        d = asdict(self)
        d["mix"] = self.mix.to_dict()
        d["formats"] = list(self.formats)
        d["noise"] = {f: asdict(spec) for f, spec in self.noise.items()}
        d["selection"] = {**asdict(self.selection), "thresholds": {f: dict(t) for f, t in self.selection.thresholds.items()}}
        return d


def shard_ranges(num: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) recipe indices of each shard."""
    return [(s, min(s + shard_size, num)) for s in range(0, num, shard_size)]


def _image_size(images: Sequence[Any]) -> tuple[int, int]:
    return images[0].size


def candidate_probes(
    handle: Any, prompts: Sequence[PromptInput], cands: list[list[Candidate]], config: PipelineConfig
) -> list[list[ProbeResult]]:
    """Probe results for every candidate: recorded ones as they are, the rest from one probe pass.

    A recorded result lacking the configured rows (`answer_tokens` of an answer cut at max_new_tokens:
    generation never ran the step at its last token) is probed again.
    """
    rows = config.selection.attention_rows
    # An answer that spells out an image placeholder (e.g. the text "<image>") must not become image
    # features in the probe: those tokens are dropped from the probed ids.
    placeholders = set(handle.family.placeholder_token_ids(handle.processor))
    todo: list[tuple[int, int]] = []
    out: list[list[ProbeResult | None]] = [[c.probe if c.probe is not None and rows in c.probe.attention else None for c in row] for row in cands]
    for i, row in enumerate(cands):
        for j, c in enumerate(row):
            if out[i][j] is None:
                c.token_ids = [t for t in c.token_ids if t not in placeholders]
                c.lead_ids = [t for t in c.lead_ids if t not in placeholders]
                todo.append((i, j))
    if todo:
        results = probe(
            handle,
            [prompts[i] for i, _ in todo],
            [cands[i][j].token_ids for i, j in todo],
            layers=config.layers,
            batch_size=config.generation.batch_size,
            leads=[cands[i][j].lead_ids for i, j in todo],
        )
        for (i, j), r in zip(todo, results, strict=True):
            out[i][j] = r
    return out  # type: ignore[return-value]


def _generation_images(recipe: Recipe, config: PipelineConfig, load: Loader) -> list[Image.Image]:
    """The rendered images generation and the attention pass see: with noise when the format asks.

    Only here: the export renders the recipe again, clean. The model is trained on the real images; the
    noise only provokes the hallucinated answers that become the rejected side of the pairs.
    """
    images = render_recipe(recipe, load)
    spec = config.noise.get(recipe.format)
    if spec is not None and spec.std > 0:
        images = perturb_target(images, recipe, spec.std, config.seed, spec.region)
    return images


def model_fit(handle_or_family: Any, processor: Any = None) -> Fit:
    """The family's `fit_images` for a model: rendered images -> (what the model is given, offsets)."""
    family = getattr(handle_or_family, "family", handle_or_family)
    processor = processor if processor is not None else handle_or_family.processor
    return lambda images: family.fit_images(processor, images)


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
    return process_recipes(recipes, config, start, handle=handle, backend=backend, load=load, on_batch=on_batch)


def process_recipes(
    recipes: Sequence[Recipe],
    config: PipelineConfig,
    start: int,
    *,
    handle: Any,
    backend: GenerationBackend,
    load: Loader,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """The shard step on given recipes (`process_shard` makes them from the samples): render, generate,
    measure attention, judge. `start` is the shard's first recipe index (it seeds the generation)."""
    tokenizer = handle.processor.tokenizer
    fit = model_fit(handle)
    gen = config.generation
    records: list[dict] = []
    for b in range(0, len(recipes), gen.batch_size):
        batch = recipes[b : b + gen.batch_size]
        prompts = [PromptInput(r.uid, r.prompt, *fit(_generation_images(r, config, load))) for r in batch]
        cands = backend.generate(prompts, replace(gen, seed=gen.seed + config.seed * 1_000_003 + start + b))
        probes = candidate_probes(handle, prompts, cands, config)
        for recipe, prompt, row, row_probes in zip(batch, prompts, cands, probes, strict=True):
            records.append(_judge(recipe, prompt, row, row_probes, config, tokenizer))
        if on_batch is not None:
            on_batch(len(batch))
    return records


def encode_attention(values: np.ndarray) -> str:
    """Per-image-token attention as base64 of little-endian float16: compact enough to keep for every
    candidate (a LLaVA image is 576 values, 1.5 kB), precise enough to draw a heat map."""
    return base64.b64encode(np.asarray(values, dtype="<f2").tobytes()).decode("ascii")


def decode_attention(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f2").astype(np.float64)


def _layouts(probe_result: ProbeResult, prompt: PromptInput) -> list[dict]:
    """Per image the model was given: its token grid and where it lies, for drawing attention over it."""
    return [
        {**asdict(layout), "fit_offset": list(prompt.offset(k))}
        for k, layout in enumerate(probe_result.layouts)
    ]


def candidate_ratios(recipe: Recipe, prompt: PromptInput, result: ProbeResult) -> dict[str, float | None]:
    """The candidate's attention ratio for each `attention_rows` setting (None: not computed, or no attention)."""
    box = target_box(recipe)
    size = None
    if box is not None:  # the target's region, moved as the image was fitted for the model (padding)
        dx, dy = prompt.offset(0)
        box = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
        size = prompt.images[0].size
    ratios: dict[str, float | None] = {}
    for rows in ROWS:
        r = recipe_ratio(result, recipe.format, recipe.target_index, size, box, rows=rows) if rows in result.attention else math.nan
        ratios[rows] = None if math.isnan(r) else r
    return ratios


def _judge(recipe: Recipe, prompt: PromptInput, cands: list[Candidate], probes: list[ProbeResult], config: PipelineConfig, tokenizer: Any) -> dict:
    sel = config.selection
    all_ratios = [candidate_ratios(recipe, prompt, p) for p in probes]
    ratios = [r[sel.attention_rows] for r in all_ratios]
    official = [p.official_perplexity(stopped=c.finish_reason == "stop") for c, p in zip(cands, probes, strict=True)]
    threshold = sel.threshold(recipe.format, recipe.n_images)
    verdicts, rejected = select(
        recipe.answer,
        [c.text for c in cands],
        ratios,
        threshold,
        strict=sel.strict(recipe.format),
        perplexities=official,
        perplexity_gate=sel.perplexity_gate,
    )
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
        "comparison": sel.comparison[recipe.format],
        "attention_rows": sel.attention_rows,
        "layouts": _layouts(probes[0], prompt) if probes else [],
        "candidates": [
            {
                "text": c.text,
                "num_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
                "ratio": ratio,
                "ratios": by_rows,
                "perplexity": None if math.isnan(p.perplexity) else p.perplexity,  # nan: empty answer
                "official_perplexity": None if math.isnan(ppl) else ppl,
                "hallucinated": v.hallucinated,
                "reason": v.reason,
                "attention": encode_attention(p.values(sel.attention_rows)),
            }
            for c, p, ratio, by_rows, ppl, v in zip(cands, probes, ratios, all_ratios, official, verdicts, strict=True)
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
    """"exported", "no_pair" (selection found no rejected answer), "perplexity_gate" (only the gate stood
    in the way) or the post-selection filter that removed it."""
    if rec["stats"] is None:
        if any(c["reason"] == PERPLEXITY_GATE for c in rec["candidates"]):
            return PERPLEXITY_GATE
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
        "comparison": rec.get("comparison", "<="),
        "attention_rows": rec.get("attention_rows"),
        "outcome": outcome,
        "rejected": rec["rejected"],
        "stats": rec["stats"],
        "candidates": [{k: v for k, v in c.items() if k != "attention"} for c in rec["candidates"]],
    }


def _add_pair(writer: ShardWriter, rec: dict, s: PairStats, load: Loader, fit: Fit) -> None:
    recipe = Recipe.from_dict(rec["recipe"])
    rejected = rec["candidates"][rec["rejected"]]
    # The clean render, even when generation saw noise, fitted as the model saw it (LLaVA: padded to a
    # square): the pairs teach the real images, and a stock processor trains on exactly these pixels.
    images, _ = fit(render_recipe(recipe, load))
    writer.add(
        ExportPair(
            uid=recipe.uid, source_id=recipe.sample_id, format=recipe.format, target_index=recipe.target_index,
            prompt=recipe.prompt, images=images, chosen=recipe.answer.strip(), rejected=rejected["text"],
            attention_ratio=rejected["ratio"], perplexity=s.perplexity, length_ratio=s.length_ratio, edit_distance=s.edit_distance,
        )
    )


def merge_and_export(
    shard_paths: Sequence[Path],
    config: PipelineConfig,
    out_dir: Path,
    load: Loader,
    fit: Fit,
    rows_per_shard: int = 500,
    on_stage: Callable[[str], None] | None = None,
    index_path: Path | None = None,
) -> MergeResult:
    """Post-select over the whole pair set and export the survivors with their dataset card.

    Args:
        shard_paths: every shard's record file (all of them: fences need the whole set).
        config: the pair set's configuration.
        out_dir: export folder (data/*.parquet, README.md, histograms/).
        load: image loader; the pair images are rendered again from their recipes.
        fit: the model family's image fitting (`model_fit`): the export stores what the model saw.
        rows_per_shard: rows per parquet shard.
        on_stage: called with "select" before the statistics pass and "export" before the export pass.
        index_path: where to write the prompt index (`core.prompts`): every prompt's place in the shard
            records and its outcome, so a viewer pages through them without reading them all.

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
        counts["distractors_from_source"] += bool(rec["recipe"].get("same_source", True))
        counts["box_samples_skipped"] += int(rec["recipe"].get("skipped", 0))
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
    removed: Counter[str] = Counter({name: 0 for name in (*FILTERS, PERPLEXITY_GATE)})
    per_format: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    writer = ShardWriter(out_dir, rows_per_shard=rows_per_shard)
    kept_stats: list[PairStats] = []
    # Why each prompt has a pair or not: every candidate's ratio, perplexity and verdict, and the
    # post-selection outcome; shipped with the export (candidates.jsonl) and described in the card.
    index = IndexWriter()
    with atomic_writer(Path(out_dir) / "candidates.jsonl", "w") as explain:
        for shard, offset, length, rec in iter_records(shard_paths):
            outcome = _outcome(rec, fences)
            index.add(shard, offset, length, rec, outcome)
            explain.write(json.dumps(_explanation(rec, outcome), ensure_ascii=False) + "\n")
            if outcome != "exported":
                if outcome in removed:
                    removed[outcome] += 1
                continue
            s = PairStats(**rec["stats"])
            _add_pair(writer, rec, s, load, fit)
            per_format[rec["recipe"]["format"]][len(rec["recipe"]["images"])] += 1
            kept_stats.append(s)
    writer.close()
    if index_path is not None:
        index.write(index_path)
    summary = {
        "prompts": counts["prompts"],
        "candidates": counts["candidates"],
        "hallucinated": counts["hallucinated"],
        "not_hallucinated": counts["not_hallucinated"],
        "hallucinated_candidates": counts["hallucinated_candidates"],
        "selected_pairs": len(stats),
        "distractors_from_source": counts["distractors_from_source"],
        "box_samples_skipped": counts["box_samples_skipped"],
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

        return OpenAIBackend(
            base_url=config.base_url or "", model=config.model, api_key=api_key, reader=handle.answer_reader(), endpoint=config.endpoint
        )
    from workers.backends.vllm import VLLMBackend
    from workers.models import resolve_model

    # The family's chat template, as generation on every other backend and training use.
    return VLLMBackend(str(resolve_model(config.model)), chat_template=handle.family.chat_template)
