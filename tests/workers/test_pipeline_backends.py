"""The pipeline gives the same judgements whichever backend generated the answers.

The hf backend records attention during generation; the openai backend (here: an OpenAI-compatible
server in front of the same model, standing in for `vllm serve`) returns text and token ids only, so
the pipeline runs the separate probe pass. Same answers must give the same ratios and verdicts.
"""

from __future__ import annotations

import pytest

from core.store import ArtifactStore
from workers.backends.chat_server import create_chat_app, serve
from workers.backends.hf import HFBackend
from workers.backends.openai import OpenAIBackend
from workers.generate import GenerationConfig
from workers.ingest import IngestLimits, ingest
from workers.pipeline import PipelineConfig, process_shard
from workers.render import store_loader
from workers.sample_data import write_sample_data


def test_openai_path_equals_hf_path(tmp_path, tiny_llava):
    store = ArtifactStore(tmp_path / "store")
    write_sample_data(tmp_path / "sd", num_samples=12, seed=2)
    limits = IngestLimits(10**9, 1000, 200.0, 10**8, 512)
    ingest(tmp_path / "sd", store, "ds", limits=limits)
    from core.dataset import read_samples

    samples = read_samples(store, "ds")
    gen = GenerationConfig(max_new_tokens=8, batch_size=1)
    hf_config = PipelineConfig(num=6, seed=1, generation=gen)
    load = store_loader(store)
    hf = HFBackend(tiny_llava)
    via_hf = process_shard(samples, hf_config, 0, 6, handle=tiny_llava, backend=hf, load=load)
    with serve(create_chat_app(HFBackend(tiny_llava, record_attention=False), "tiny-llava")) as url:
        oa_config = PipelineConfig(num=6, seed=1, generation=gen, backend="openai", base_url=url)
        backend = OpenAIBackend(url, "tiny-llava", backoff_s=(0.01,), reader=tiny_llava.answer_reader())
        try:
            via_openai = process_shard(samples, oa_config, 0, 6, handle=tiny_llava, backend=backend, load=load)
        finally:
            backend.close()
    assert len(via_hf) == len(via_openai) == 6
    assert len({r["recipe"]["format"] for r in via_hf}) >= 2  # more than one ratio kind is compared
    for a, b in zip(via_hf, via_openai, strict=True):
        assert a["recipe"] == b["recipe"]
        for ca, cb in zip(a["candidates"], b["candidates"], strict=True):
            assert ca["text"] == cb["text"]
            assert ca["ratio"] == pytest.approx(cb["ratio"], abs=1e-6)
            assert ca["perplexity"] == pytest.approx(cb["perplexity"], rel=1e-5)
            assert (ca["hallucinated"], ca["reason"]) == (cb["hallucinated"], cb["reason"])
        assert a["rejected"] == b["rejected"]
