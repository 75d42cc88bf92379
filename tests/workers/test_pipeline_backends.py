"""The pipeline gives the same judgements whichever backend generated the answers.

The hf backend records attention during generation; the openai backend (here: `transformers serve` on
the same model folder, a real OpenAI-compatible server standing in for `vllm serve`) returns text only,
so the pipeline re-tokenises it and runs the separate probe pass. Same answers must give the same
ratios and verdicts.
"""

from __future__ import annotations

import pytest

from core.store import ArtifactStore
from workers.backends.hf import HFBackend
from workers.backends.openai import OpenAIBackend
from workers.generate import GenerationConfig
from workers.ingest import IngestLimits, ingest
from workers.pipeline import PipelineConfig, process_shard
from workers.render import store_loader
from workers.sample_data import write_sample_data

NUM = 8


def test_openai_path_equals_hf_path(tmp_path, tiny_llava, served_tiny_llava):
    url, model = served_tiny_llava
    store = ArtifactStore(tmp_path / "store")
    write_sample_data(tmp_path / "sd", num_samples=12, seed=2)
    limits = IngestLimits(10**9, 1000, 200.0, 10**8, 512)
    ingest(tmp_path / "sd", store, "ds", limits=limits)
    from core.dataset import read_samples

    samples = read_samples(store, "ds")
    gen = GenerationConfig(max_new_tokens=8, batch_size=1)
    hf_config = PipelineConfig(num=NUM, seed=1, generation=gen)
    load = store_loader(store)
    hf = HFBackend(tiny_llava)
    via_hf = process_shard(samples, hf_config, 0, NUM, handle=tiny_llava, backend=hf, load=load)
    oa_config = PipelineConfig(num=NUM, seed=1, generation=gen, backend="openai", base_url=url)
    backend = OpenAIBackend(url, model, backoff_s=(0.01,), reader=tiny_llava.answer_reader())
    try:
        via_openai = process_shard(samples, oa_config, 0, NUM, handle=tiny_llava, backend=backend, load=load)
    finally:
        backend.close()
    assert len(via_hf) == len(via_openai) == NUM
    assert len({r["recipe"]["format"] for r in via_hf}) == 3  # every ratio kind is compared
    for a, b in zip(via_hf, via_openai, strict=True):
        assert a["recipe"] == b["recipe"]
        for ca, cb in zip(a["candidates"], b["candidates"], strict=True):
            assert ca["text"] == cb["text"]
            # The random tiny model may emit bytes that are not UTF-8: such text does not re-tokenise to
            # the ids it was decoded from, and only then may the two passes see different tokens.
            exact = "\ufffd" not in ca["text"]
            assert ca["ratio"] == pytest.approx(cb["ratio"], abs=1e-6 if exact else 1e-2)
            assert ca["perplexity"] == pytest.approx(cb["perplexity"], rel=1e-5 if exact else 0.5)
            assert (ca["hallucinated"], ca["reason"]) == (cb["hallucinated"], cb["reason"])
        assert a["rejected"] == b["rejected"]
