"""Generation backends implementing `workers.generate.GenerationBackend` (DESIGN 2.3).

One module per backend: `hf` (in-process transformers), `vllm` (offline engine), `openai`
(an OpenAI-compatible server). Import the one you use; nothing here imports any of them, so the
optional dependencies of one backend never load for another.
"""
