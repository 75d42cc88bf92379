"""RQ entry points: ids in, inputs loaded from the store and Redis, the stages called, records updated.

Enqueued only by `core.jobs`. A job is idempotent: it checks its record first, so a retried or re-run
job (after a worker died) redoes its own work at most. User faults (`UserError`) fail the resource
without a retry; anything else is raised for RQ to retry with backoff, and when retries run out the
failure callback (`on_job_failure`) fails the resource with a generic error (details in the worker log).

A pair set is three kinds of job (DESIGN 3.2), all enqueued by `core.jobs`:

    pairset-{id}                 cpu  run_pairset: check the dataset, mark running, enqueue the rest
    pairset-{id}-shard-{i:05d}   gpu  run_pairset_shard: recipes [start, stop) -> pairsets/{id}/shards/{i:05d}.jsonl
    pairset-{id}-merge           cpu  merge_pairset, once every shard succeeded: post-selection and export

Shard jobs run on non-forking workers (`cli.services.MiadpoSimpleWorker`) and keep the model they
loaded for the next shard of the same model (`_model_for`). They stop at their next batch when the
pair set is cancelled or has failed in another job (`PairSetStopped`, never retried).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from redis import Redis
from rq.exceptions import AbandonedJobError
from rq.timeouts import JobTimeoutException

from core import evaluations, images, jobs, prompts, records, trainings
from core.dataset import Sample, dataset_dir, read_samples
from core.errors import FatalError, MiadpoError, NotFoundError, TransientError, UserError
from core.exports import archive_path, export_dir, shard_path
from core.settings import Settings, get_settings
from core.store import ArtifactStore

# The pipeline is imported here, not in the job functions: `miadpo worker` imports this module before it
# forks, so a forked job (run_pairset, merge_pairset) starts warm instead of importing torch,
# transformers and datasets again (~5 s each time).
from workers.augment import AugmentMix
from workers.evaluate import EvalConfig, evaluate_shard, summarise
from workers.generate import GenerationBackend, GenerationConfig
from workers.models import ModelHandle, load_model, load_processor
from workers.pipeline import (
    NoiseSpec,
    PipelineConfig,
    make_backend,
    merge_and_export,
    model_fit,
    process_shard,
    read_records,
    shard_ranges,
    write_records,
)
from workers.postselect import PostSelectionConfig
from workers.render import store_loader
from workers.select import SelectionConfig

log = logging.getLogger(__name__)

_PROGRESS_EVENT_EVERY_S = 2.0  # at most one `progress` event per pair set this often, whichever shard reports


@lru_cache(maxsize=1)
def _redis() -> Redis:
    return Redis.from_url(get_settings().redis_url)


def _store() -> ArtifactStore:
    return ArtifactStore(get_settings().data_dir)


def ingest_dataset(dataset_id: str) -> dict[str, Any]:
    """Validate and normalise an uploaded dataset; the record ends `ready` (counts, problems) or `failed`.

    Args:
        dataset_id: the dataset record's id; its `upload` is the uploaded file under the store.

    Returns:
        The outcome for the RQ job result: {"status", "num_samples", "num_problems"}.

    Raises:
        Anything but UserError (a Redis blip, a full disk): RQ retries the job.
    """
    from workers.ingest import IngestLimits, ingest  # PIL and numpy only in the work horse

    settings, r, store = get_settings(), _redis(), _store()
    record = records.find(r, records.DATASET, dataset_id)
    if record is None or record["status"] != "validating":
        return {"status": record["status"] if record else "deleted"}  # a re-run after the work was done
    try:
        manifest = ingest(
            store.path(record["upload"]),
            store,
            dataset_id,
            limits=IngestLimits.from_settings(settings),
            source_format=record["format"],
        )
    except UserError as exc:
        log.info("dataset %s refused: %s: %s", dataset_id, exc.code, exc.message)
        code, message = exc.code, exc.message
        _forget(r, dataset_id, lambda: records.set_dataset_failed(r, dataset_id, code=code, message=message))
        shutil.rmtree(store.path("uploads", dataset_id), ignore_errors=True)
        return {"status": "failed"}
    images.acquire(r, store, dataset_id, images.dataset_refs(store, dataset_id))
    try:
        records.set_dataset_ready(r, dataset_id, manifest.to_dict(), max_problems=settings.max_problems_listed)
    except NotFoundError:
        # Deleted while we were ingesting: take back what we wrote.
        images.release(r, store, dataset_id)
        shutil.rmtree(dataset_dir(store, dataset_id), ignore_errors=True)
        return {"status": "deleted"}
    # Only now: a retry after a failed record update still finds the upload.
    shutil.rmtree(store.path("uploads", dataset_id), ignore_errors=True)
    return {"status": "ready", "num_samples": manifest.num_samples, "num_problems": len(manifest.problems)}


# --------------------------------------------------------------------------------------------------
# Pair sets


class PairSetStopped(Exception):
    """The pair set was cancelled, or failed in another of its jobs, while this job ran: stop, no retry."""


def pipeline_config(request: dict[str, Any], settings: Settings) -> PipelineConfig:
    """The pipeline configuration of a pair-set request (the `PairSetCreate` stored in the record): the one
    mapping from the API's schema to the stages' configs.

    A request that names no generation backend (or no endpoint for `openai`) gets this worker's deployment
    defaults (`MIADPO_GENERATION_BACKEND`, `MIADPO_GENERATION_ENDPOINT`); an endpoint is a name the operator
    gave a server (`MIADPO_GENERATION_ENDPOINTS`), never a URL from the request.

    Raises:
        UserError: the stages refuse the combination (code `invalid_config`).
    """
    aug, gen, sel, post = (request[k] for k in ("augmentation", "generation", "selection", "post_selection"))
    backend = gen.get("backend") or settings.generation_backend
    endpoint = gen.get("endpoint") or (settings.generation_endpoint if backend == "openai" else None)
    if endpoint is not None and endpoint not in settings.generation_endpoints:
        raise UserError(
            f"generation endpoint {endpoint!r} is not configured here", code="unknown_endpoint", param="generation.endpoint"
        )
    if backend == "openai" and endpoint is None:
        raise UserError(
            "backend openai needs a generation endpoint and this deployment has no default one",
            code="no_endpoint",
            param="generation.endpoint",
        )
    base_url = settings.generation_endpoints[endpoint] if endpoint is not None else None
    thresholds = {fmt: {int(n): float(t) for n, t in table.items()} for fmt, table in (sel.get("thresholds") or {}).items()}
    preset = request.get("preset", "paper")
    try:
        return PipelineConfig(
            model=request["model"],
            num=aug["num"],
            formats=tuple(aug["formats"]),
            mix=AugmentMix.from_dict({k: v for k, v in (aug.get("mix") or {}).items() if v is not None}),
            seed=request["seed"],
            generation=GenerationConfig(
                max_new_tokens=gen["max_new_tokens"],
                num_candidates=gen["num_candidates"],
                temperature=gen["temperature"],
                top_p=gen["top_p"],
                batch_size=gen["batch_size"],
            ),
            selection=SelectionConfig(
                preset=preset,
                thresholds=thresholds,
                attention_rows=sel.get("attention_rows", "producing"),
                comparison=sel.get("comparison") or {},
                perplexity_gate=sel.get("perplexity_gate"),
            ),
            post_selection=PostSelectionConfig(
                k=post["k"], perplexity=post["perplexity"], length_ratio=post["length_ratio"], edit_distance=post["edit_distance"]
            ),
            backend=backend,
            base_url=base_url,
            endpoint=endpoint,
            shard_size=request["shard_size"],
            noise={fmt: NoiseSpec(**spec) for fmt, spec in (gen.get("noise") or {}).items()},
            preset=preset,
        )
    except ValueError as exc:
        raise UserError(f"invalid pair-set configuration: {exc}", code="invalid_config") from None


def _num_shards(config: PipelineConfig) -> int:
    return len(shard_ranges(config.num, config.shard_size))


def _still_running(r: Redis, record: records.Record) -> None:
    """PairSetStopped unless the pair set is running and nobody asked to cancel it."""
    if record["status"] != "running" or records.cancel_requested(r, record["id"]):
        raise PairSetStopped(f"pair set {record['id']} is {record['status']}; stopping")


def run_pairset(pairset_id: str) -> dict[str, Any]:
    """Start a pair set: check its dataset, mark it running (stage `generate`), enqueue its shard jobs and
    the merge job (`core.jobs.enqueue_pairset_shards`).

    Args:
        pairset_id: the pair-set record's id.

    Returns:
        {"status"} of the pair set afterwards, and "shards" when it started.

    Raises:
        UserError: the dataset is gone or not ready, or the configuration is refused.
    """
    settings, r = get_settings(), _redis()
    record = records.find(r, records.PAIRSET, pairset_id)
    if record is None:
        return {"status": "deleted"}
    if record["status"] in records.PAIRSET_TERMINAL:
        return {"status": record["status"]}
    if records.cancel_requested(r, pairset_id):
        return {"status": records.set_pairset_status(r, pairset_id, "cancelled")["status"]}
    dataset = records.find(r, records.DATASET, record["dataset_id"])
    if dataset is None or dataset["status"] != "ready":
        state = dataset["status"] if dataset else "deleted"
        raise UserError(f"dataset {record['dataset_id']} is {state}, not ready", code="dataset_not_ready", param="dataset_id")
    config = pipeline_config(record["config"], settings)
    num_shards = _num_shards(config)
    if records.start_pairset(r, pairset_id, total=config.num, num_shards=num_shards)["status"] != "running":
        return {"status": records.get(r, records.PAIRSET, pairset_id)["status"]}
    jobs.enqueue_pairset_shards(r, pairset_id, num_shards, settings=settings)
    # A cancel (or a shard failing for good) while we were enqueueing may have missed what came after it.
    status = records.get(r, records.PAIRSET, pairset_id)["status"]
    if status != "running":
        jobs.stop_pairset(r, pairset_id, skip=(jobs.pairset_job_id(pairset_id),))
    return {"status": status, "shards": num_shards}


@dataclass
class _LoadedModel:
    key: tuple[Any, ...]
    handle: ModelHandle
    backend: GenerationBackend


_loaded: _LoadedModel | None = None


def _model_for(
    config: PipelineConfig, settings: Settings, adapter: Path | None = None
) -> tuple[ModelHandle, GenerationBackend]:
    """The model (with `adapter` merged, if any) and generation backend for `config`, loaded once per
    process and kept while jobs for the same model keep coming (a gpu worker does not fork); a job for
    another model replaces them."""
    global _loaded
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (config.model, device, config.backend, config.base_url, config.layers, str(adapter) if adapter else None)
    if _loaded is not None and _loaded.key == key:
        return _loaded.handle, _loaded.backend
    if _loaded is not None:
        log.info("unloading model %s for %s", _loaded.key[0], config.model)
        _loaded.backend.close()
        _loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    handle = load_model(config.model, settings, device=device, adapter=adapter)
    _loaded = _LoadedModel(key, handle, make_backend(config, handle, api_key=settings.openai_api_key))
    return _loaded.handle, _loaded.backend


@lru_cache(maxsize=4)
def _samples(store_root: Path, dataset_id: str) -> tuple[Sample, ...]:
    """A ready dataset's samples (immutable once ready), read once per process."""
    return tuple(read_samples(ArtifactStore(store_root), dataset_id))


def _lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _record_generation(r: Redis, pairset_id: str, config: PipelineConfig) -> None:
    """Write the backend (and server) this deployment chose into a request that named none, so that the
    record and the dataset card say what generated the candidates."""

    def mutate(rec: records.Record) -> records.Record | None:
        gen = rec["config"]["generation"]
        if gen.get("backend") is not None:
            return None
        rec["config"] = {**rec["config"], "generation": {**gen, "backend": config.backend, "endpoint": config.endpoint}}
        return rec

    records.update(r, records.PAIRSET, pairset_id, mutate)


def run_pairset_shard(pairset_id: str, index: int) -> dict[str, Any]:
    """Render, generate, measure attention and judge one shard's recipes; write its records atomically
    to `pairsets/{id}/shards/{index:05d}.jsonl`. A shard whose file is already complete is not redone.

    Args:
        pairset_id: the pair-set record's id.
        index: the shard's position in `shard_ranges(num, shard_size)`.

    Returns:
        {"status": "done" | "skipped", "prompts"}, or {"status": "deleted"}.

    Raises:
        PairSetStopped: the pair set was cancelled or failed elsewhere (checked before and between batches).
    """
    settings, r, store = get_settings(), _redis(), _store()
    record = records.find(r, records.PAIRSET, pairset_id)
    if record is None:
        return {"status": "deleted"}
    _still_running(r, record)
    config = pipeline_config(record["config"], settings)
    if record["config"]["generation"].get("backend") is None:
        _record_generation(r, pairset_id, config)
    start, stop = shard_ranges(config.num, config.shard_size)[index]
    path = shard_path(store, pairset_id, index)
    if path.is_file() and _lines(path) == stop - start:  # a re-run after the work was done
        records.report_shard_progress(r, pairset_id, index, stop - start)
        return {"status": "skipped", "prompts": stop - start}
    samples = _samples(store.root, record["dataset_id"])
    handle, backend = _model_for(config, settings)
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if records.cancel_requested(r, pairset_id):
            raise PairSetStopped(f"pair set {pairset_id} was cancelled")
        rec = records.report_shard_progress(r, pairset_id, index, done, event_every_s=_PROGRESS_EVENT_EVERY_S)
        if rec["status"] != "running":
            raise PairSetStopped(f"pair set {pairset_id} is {rec['status']}; stopping")

    out = process_shard(samples, config, start, stop, handle=handle, backend=backend, load=store_loader(store), on_batch=on_batch)
    write_records(path, out)
    return {"status": "done", "prompts": len(out)}


def merge_pairset(pairset_id: str) -> dict[str, Any]:
    """Post-select over every shard's records and export the pairs (stages `select`, then `export`) to
    `pairsets/{id}/export`, swapped in whole; then the counts, status `succeeded`, stage `done`.

    Args:
        pairset_id: the pair-set record's id.

    Returns:
        {"status"} of the pair set afterwards, with "pairs" when it succeeded.

    Raises:
        PairSetStopped: the pair set was cancelled in the meantime.
        FatalError: a shard's output is missing although its job succeeded.
    """
    settings, r, store = get_settings(), _redis(), _store()
    record = records.find(r, records.PAIRSET, pairset_id)
    if record is None:
        return {"status": "deleted"}
    if record["status"] == "succeeded":  # a re-run after the work was done
        if record["config"].get("train") is not None:
            _chain_training(r, record, settings)  # in case the run that finished died before it did this
        return {"status": "succeeded"}
    _still_running(r, record)
    config = pipeline_config(record["config"], settings)
    paths = [shard_path(store, pairset_id, i) for i in range(_num_shards(config))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FatalError(f"pair set {pairset_id}: shard outputs missing: {', '.join(missing)}", code="shard_output_missing")

    def on_stage(stage: str) -> None:
        if records.set_pairset_stage(r, pairset_id, stage)["status"] != "running":
            raise PairSetStopped(f"pair set {pairset_id} is no longer running")

    out = export_dir(store, pairset_id)
    for stale in out.parent.glob(".export-*"):  # left by a merge that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        family, processor = load_processor(config.model, settings)  # no weights: only the image fitting
        result = merge_and_export(
            paths, config, staging, store_loader(store), model_fit(family, processor), on_stage=on_stage,
            index_path=prompts.index_path(store, pairset_id),
        )
        archive_path(store, pairset_id).unlink(missing_ok=True)  # built from an earlier export
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    c = result.counts
    counts = {
        "prompts": c["prompts"],
        "candidates": c["candidates"],
        "hallucinated": c["hallucinated"],
        "pairs": c["pairs"],
        "distractors_from_source": c["distractors_from_source"],
        "box_samples_skipped": c["box_samples_skipped"],
        "removed": {name: int(c["removed"].get(name, 0)) for name in ("perplexity", "length_ratio", "edit_distance", "perplexity_gate")},
    }
    training_id = None
    if record["config"].get("train") is not None and counts["pairs"]:
        # The training record (not its job) before the pair set says succeeded: whoever sees that finds
        # its `training_id`, and the `training_created` event comes before the final status event.
        training_id = jobs.create_training_for_pairset(r, pairset_id)
    rec = records.finish_pairset(r, pairset_id, counts)
    if rec["status"] != "succeeded":
        if training_id is not None:
            _forget(r, training_id, lambda: records.set_training_status(r, training_id, "cancelled"))
        return {"status": rec["status"]}
    if rec["config"].get("train") is not None:
        _chain_training(r, rec, settings)
    return {"status": "succeeded", "pairs": counts["pairs"]}


def _chain_training(r: Redis, record: records.Record, settings: Settings) -> None:
    """A pair set created with `train` starts its training once its pairs are exported (at most one:
    `enqueue_training_for_pairset` finds the training an earlier run of the merge started)."""
    if not record["counts"]["pairs"]:
        records.append_event(r, record["id"], "warning", {"message": "train was requested, but there are no pairs to train on"})
        return
    jobs.enqueue_training_for_pairset(r, record["id"], settings=settings)


# --------------------------------------------------------------------------------------------------
# Evaluations (DESIGN 6): the same three kinds of job as a pair set


def evaluation_config(request: dict[str, Any]) -> EvalConfig:
    """The evaluation configuration of an evaluation request (the `EvaluationCreate` stored in the record).

    Raises:
        UserError: the stage refuses the combination (code `invalid_config`).
    """
    try:
        return EvalConfig(
            model=request["model"],
            num=request["num"],
            formats=tuple(request["formats"]),
            seed=request["seed"],
            max_new_tokens=request["max_new_tokens"],
            batch_size=request.get("batch_size", 8),
            shard_size=request.get("shard_size", 200),
        )
    except (ValueError, KeyError) as exc:
        raise UserError(f"invalid evaluation configuration: {exc}", code="invalid_config") from None


def _adapter_of(store: ArtifactStore, record: records.Record) -> Path | None:
    """The adapter folder of the training an evaluation names (it has succeeded: checked at create time)."""
    training_id = record.get("training_id")
    if not training_id:
        return None
    folder = trainings.adapter_dir(store, training_id)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"training {training_id} has no adapter", code="adapter_missing", param="training_id")
    return folder


def _report(r: Redis, record: records.Record) -> None:
    """A training's own evaluation writes its status and result into the training."""
    target = record.get("report_to")
    if target:
        _forget(r, target["training_id"], lambda: records.report_to_training(r, target["training_id"], target["role"], record))


def run_evaluation(evaluation_id: str) -> dict[str, Any]:
    """Start an evaluation: check its dataset, mark it running (stage `generate`), enqueue shards and merge.

    Raises:
        UserError: the dataset is gone or not ready, or the configuration is refused.
    """
    settings, r = get_settings(), _redis()
    record = records.find(r, records.EVALUATION, evaluation_id)
    if record is None:
        return {"status": "deleted"}
    if record["status"] in records.EVALUATION_TERMINAL:
        return {"status": record["status"]}
    if records.cancel_requested(r, evaluation_id):
        return {"status": records.set_evaluation_status(r, evaluation_id, "cancelled")["status"]}
    dataset = records.find(r, records.DATASET, record["dataset_id"])
    if dataset is None or dataset["status"] != "ready":
        state = dataset["status"] if dataset else "deleted"
        raise UserError(f"dataset {record['dataset_id']} is {state}, not ready", code="dataset_not_ready", param="dataset_id")
    config = evaluation_config(record["config"])
    num_shards = len(shard_ranges(config.num, config.shard_size))
    rec = records.start_evaluation(r, evaluation_id, total=config.num, num_shards=num_shards)
    if rec["status"] != "running":
        return {"status": rec["status"]}
    _report(r, rec)
    jobs.enqueue_evaluation_shards(r, evaluation_id, num_shards, settings=settings)
    status = records.get(r, records.EVALUATION, evaluation_id)["status"]
    if status != "running":
        jobs.stop_sharded(r, records.EVALUATION, evaluation_id, skip=(jobs.start_job_id(records.EVALUATION, evaluation_id),))
    return {"status": status, "shards": num_shards}


def run_evaluation_shard(evaluation_id: str, index: int) -> dict[str, Any]:
    """Answer and score one shard's prompts; write its records atomically. A complete shard is not redone.

    Raises:
        PairSetStopped: the evaluation was cancelled or failed elsewhere (checked before and between batches).
    """
    settings, r, store = get_settings(), _redis(), _store()
    record = records.find(r, records.EVALUATION, evaluation_id)
    if record is None:
        return {"status": "deleted"}
    _still_running(r, record)
    config = evaluation_config(record["config"])
    start, stop = shard_ranges(config.num, config.shard_size)[index]
    path = evaluations.shard_path(store, evaluation_id, index)
    if path.is_file() and _lines(path) == stop - start:
        records.report_evaluation_progress(r, evaluation_id, index, stop - start)
        return {"status": "skipped", "prompts": stop - start}
    samples = _samples(store.root, record["dataset_id"])
    # Answers come from the in-process model (an adapter is merged into it): the hf backend.
    handle, backend = _model_for(PipelineConfig(model=config.model, layers=config.layers), settings, _adapter_of(store, record))
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if records.cancel_requested(r, evaluation_id):
            raise PairSetStopped(f"evaluation {evaluation_id} was cancelled")
        rec = records.report_evaluation_progress(r, evaluation_id, index, done, event_every_s=_PROGRESS_EVENT_EVERY_S)
        if rec["status"] != "running":
            raise PairSetStopped(f"evaluation {evaluation_id} is {rec['status']}; stopping")

    out = evaluate_shard(samples, config, start, stop, handle=handle, backend=backend, load=store_loader(store), on_batch=on_batch)
    write_records(path, out)
    return {"status": "done", "prompts": len(out)}


def merge_evaluation(evaluation_id: str) -> dict[str, Any]:
    """Summarise every shard's records (stage `summarise`) into the result; write the per-sample records."""
    r, store = _redis(), _store()
    record = records.find(r, records.EVALUATION, evaluation_id)
    if record is None:
        return {"status": "deleted"}
    if record["status"] == "succeeded":
        _report(r, record)
        return {"status": "succeeded"}
    _still_running(r, record)
    config = evaluation_config(record["config"])
    paths = [evaluations.shard_path(store, evaluation_id, i) for i in range(len(shard_ranges(config.num, config.shard_size)))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FatalError(f"evaluation {evaluation_id}: shard outputs missing: {', '.join(missing)}", code="shard_output_missing")
    records.set_evaluation_stage(r, evaluation_id, "summarise")
    write_records(evaluations.samples_path(store, evaluation_id), read_records(paths))
    result = summarise(read_records(paths))
    rec = records.finish_evaluation(r, evaluation_id, result)
    _report(r, rec)
    return {"status": rec["status"]}


# --------------------------------------------------------------------------------------------------
# RQ callbacks (set on every job by core.jobs.enqueue)


def _forget(r: Redis, resource_id: str, write: Any) -> None:
    """Run a record write; a record deleted in the meantime is not an error."""
    try:
        write()
    except NotFoundError:
        log.info("record %s is gone; nothing to update", resource_id)


def _error_of(exc_type: type[BaseException] | None, exc: BaseException | None) -> dict[str, str]:
    """The {code, message} a user sees for a job that failed for good; internals stay in the log."""
    if exc_type is not None and issubclass(exc_type, JobTimeoutException):
        return {"code": "job_timeout", "message": "the job ran past its time limit"}
    if exc_type is not None and issubclass(exc_type, AbandonedJobError):
        return {"code": "worker_lost", "message": "the worker running the job died, and retries ran out"}
    if isinstance(exc, TransientError):
        return {"code": exc.code, "message": f"{exc.message} (retries ran out)"}
    if isinstance(exc, MiadpoError):
        return {"code": exc.code, "message": exc.message}
    name = exc_type.__name__ if exc_type else "error"
    return {"code": "internal_error", "message": f"internal error ({name}); see the worker log"}


def _report_evaluation(r: Redis, evaluation_id: str) -> None:
    record = records.find(r, records.EVALUATION, evaluation_id)
    if record is not None:
        _report(r, record)


def on_job_failure(job: Any, connection: Redis, exc_type: Any = None, exc: Any = None, tb: Any = None) -> None:
    """A job raised, timed out or was abandoned: note a coming retry, or fail its resource for good.

    A `UserError` is never retried, whichever job raises it: the resource fails with its code and message.
    A pair-set job that stopped because its pair set was cancelled or failed elsewhere (`PairSetStopped`)
    is not retried either. A pair set that fails or is cancelled has its other jobs stopped, so that no
    shard runs on for nothing and the merge does not wait for ever on a shard that will never succeed.
    """
    resource = (job.meta or {}).get("resource")
    if not resource:
        return
    kind, resource_id = resource
    if isinstance(exc, UserError | PairSetStopped):
        # Bad input does not get better by retrying, nor does a cancelled pair set; RQ reads
        # retries_left right after this callback.
        job.retries_left = 0
    if job.retries_left:  # RQ retries it right after this callback
        name = exc_type.__name__ if exc_type else "error"
        records.append_event(connection, resource_id, "retry", {"job": job.id, "error": name, "retries_left": job.retries_left})
        return
    if kind in (records.PAIRSET, records.EVALUATION) and isinstance(exc, PairSetStopped):
        log.info("job %s stopped: %s", job.id, exc)
        _forget(connection, resource_id, lambda: records.sharded.set_status(connection, kind, resource_id, "cancelled"))
        jobs.stop_sharded(connection, kind, resource_id, skip=(job.id,))
        if kind == records.EVALUATION:
            _report_evaluation(connection, resource_id)
        return
    error = _error_of(exc_type, exc)
    log.warning("job %s failed for good: %s", job.id, error)
    if kind == records.DATASET:
        _forget(connection, resource_id, lambda: records.set_dataset_failed(connection, resource_id, **error))
    elif kind in (records.PAIRSET, records.EVALUATION):
        _forget(connection, resource_id, lambda: records.sharded.set_status(connection, kind, resource_id, "failed", error=error))
        # Its other jobs must not run on (or, for the merge, wait for ever) for nothing.
        jobs.stop_sharded(connection, kind, resource_id, skip=(job.id,))
        if kind == records.EVALUATION:
            _report_evaluation(connection, resource_id)
    elif kind == records.TRAINING:
        _forget(connection, resource_id, lambda: records.set_training_status(connection, resource_id, "failed", error=error))


def on_job_stopped(job: Any, connection: Redis) -> None:
    """A job was stopped on request (a cancel): its pair set (or training) ends `cancelled`."""
    resource = (job.meta or {}).get("resource")
    if not resource:
        return
    kind, resource_id = resource
    if kind in (records.PAIRSET, records.EVALUATION):
        _forget(connection, resource_id, lambda: records.sharded.set_status(connection, kind, resource_id, "cancelled"))
        if kind == records.EVALUATION:
            _report_evaluation(connection, resource_id)
    elif kind == records.TRAINING:
        _forget(connection, resource_id, lambda: records.set_training_status(connection, resource_id, "cancelled"))
    elif kind == records.DATASET:
        error = {"code": "stopped", "message": "the ingest job was stopped"}
        _forget(connection, resource_id, lambda: records.set_dataset_failed(connection, resource_id, **error))
