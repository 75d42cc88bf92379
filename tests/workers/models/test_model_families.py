"""Model families: registry, loading, prompts, image-token spans and patch grids (DESIGN 2.3, 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import UserError
from core.settings import Settings
from workers.generate import PromptInput
from workers.models import BUILTINS, FAMILIES, family_for, image_spans, load_model, resolve_model
from workers.models.builtin import BuiltinModel, ensure_builtin
from workers.models.llava import FAMILY as LLAVA
from workers.models.llava import LLAVA_HF_TEMPLATE, VICUNA_V1_SYSTEM, build_tiny_llava
from workers.models.qwen2_5_vl import FAMILY as QWEN
from workers.models.qwen2_5_vl import build_tiny_qwen


def sequence_prompt(n: int) -> str:
    lines = "\n".join(f"Image{i}:<image>" for i in range(1, n + 1))
    return f"{lines}\nIn Image{n}, what colour is the cube?"


def test_registry_has_both_families_and_their_builtin_models():
    assert set(FAMILIES) == {"llava", "qwen2.5-vl"}
    assert family_for("llava") is LLAVA
    assert family_for("qwen2_5_vl") is QWEN
    builtin_families = {name: model.family for name, model in BUILTINS.items()}
    assert {"tiny-llava": "llava", "tiny-llava-hf": "llava", "tiny-qwen2.5-vl": "qwen2.5-vl"}.items() <= builtin_families.items()


def test_unknown_model_type_is_a_user_error_naming_the_families(tmp_path: Path):
    from transformers import BertConfig

    BertConfig(
        num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(tmp_path / "models" / "bert")
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models")
    with pytest.raises(UserError) as err:
        load_model("bert", settings)
    assert "bert" in err.value.message and "llava" in err.value.message and "qwen2.5-vl" in err.value.message
    (tmp_path / "models" / "broken").mkdir()
    (tmp_path / "models" / "broken" / "config.json").write_text("secret words, not JSON")
    with pytest.raises(UserError) as err:
        load_model("broken", settings)
    assert err.value.code == "model_invalid" and "secret" not in err.value.message  # a file's content never shows


@pytest.mark.parametrize("name", ["nowhere", "/etc", "/etc/passwd", "/root", "/nonexistent", "../data", "models/../bert", str(Path.home())])
def test_a_model_is_a_name_never_a_path(tmp_path: Path, name: str):
    """Paths, existing or not, get the same answer as an unknown name: nothing about the host's files."""
    (tmp_path / "models").mkdir()
    with pytest.raises(UserError) as err:
        resolve_model(name, Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models"))
    assert err.value.code == "model_not_found" and err.value.message.startswith(f"model {name!r} is not available here")


def test_tiny_models_load_from_the_data_dir_and_by_path(tiny_llava, tiny_qwen, tiny_model_settings):
    for handle, name in ((tiny_llava, "tiny-llava"), (tiny_qwen, "tiny-qwen2.5-vl")):
        path = tiny_model_settings.data_dir / "models" / name
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        assert handle.num_layers == 2 and handle.default_layers == (1,)
        assert handle.model.dtype == torch.float32 and not handle.model.training
        by_path = load_model(name, tiny_model_settings.model_copy(update={"models_dir": path.parent}))
        assert by_path.family is handle.family
        for (k, v), (k2, v2) in zip(
            handle.model.state_dict().items(), by_path.model.state_dict().items(), strict=True
        ):
            assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("build", [build_tiny_llava, build_tiny_qwen], ids=["llava", "qwen"])
def test_tiny_build_is_seeded(build, tmp_path: Path):
    build(tmp_path / "a", 0)
    build(tmp_path / "b", 0)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ensure_builtin_keeps_the_first_complete_build(tmp_path: Path):
    def build(path: Path, seed: int) -> None:
        """Another worker finishes the same model while this one is still building."""
        other = tmp_path / "models" / "tiny-racer"
        other.mkdir(parents=True)
        (other / "config.json").write_text('{"by": "other"}')
        (path / "config.json").write_text('{"by": "us"}')

    racer = BuiltinModel("tiny-racer", "llava", "a race", build=build)
    target = ensure_builtin(racer, tmp_path)
    assert (target / "config.json").read_text() == '{"by": "other"}'
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-racer"]  # no staging left behind
    assert ensure_builtin(racer, tmp_path) == target  # complete: not rebuilt (would fail: exists)


def test_messages_keep_images_where_the_recipe_put_them():
    assert LLAVA.messages("Image1:<image>\nImage2:<image>\nIn Image2, why?") == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Image1:"},
                {"type": "image"},
                {"type": "text", "text": "\nImage2:"},
                {"type": "image"},
                {"type": "text", "text": "\nIn Image2, why?"},
            ],
        }
    ]
    assert QWEN.messages("<image><image>x")[0]["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "x"},
    ]


def test_chat_text_per_family(tiny_llava, tiny_qwen, tiny_model_settings):
    prompt = "Image1:<image>\nImage2:<image>\nIn Image2, why?"
    llava_text = LLAVA.chat_text(tiny_llava.processor, prompt)
    # vicuna_v1 as LLaVA-1.5 was trained with it; the BOS written by the template.
    assert llava_text == f"<s>{VICUNA_V1_SYSTEM} USER: {prompt} ASSISTANT:"
    # The processor a family loads renders the same (TRL renders the exported pairs with it), also for a
    # checkpoint that ships llava-hf's images-first template.
    hf_like = load_model("tiny-llava-hf", tiny_model_settings).processor
    saved = (tiny_model_settings.data_dir / "models" / "tiny-llava-hf" / "chat_template.jinja")
    assert saved.read_text() == LLAVA_HF_TEMPLATE  # the checkpoint's own template is the wrong one
    for processor in (tiny_llava.processor, hf_like):
        assert (
            processor.apply_chat_template(LLAVA.messages(prompt), add_generation_prompt=True, tokenize=False)
            == llava_text
        )
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "A red cube."}]}]
    assert hf_like.apply_chat_template(LLAVA.messages(prompt) + answer, tokenize=False) == llava_text + " A red cube.</s>"
    assert QWEN.chat_text(tiny_qwen.processor, prompt) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Image1:<|vision_start|><|image_pad|><|vision_end|>\nImage2:<|vision_start|><|image_pad|><|vision_end|>\n"
        "In Image2, why?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llava_spans_and_grids_for_1_to_9_images(tiny_llava, noise_image):
    prompts = [
        PromptInput(
            f"p{n}", sequence_prompt(n), [noise_image(300 + 40 * i, 200 + 30 * i, i) for i in range(n)]
        )
        for n in range(1, 10)
    ]
    enc = LLAVA.encode(tiny_llava.processor, prompts)
    ids = enc.inputs["input_ids"]
    image_id = tiny_llava.processor.image_token_id
    assert enc.inputs["pixel_values"].shape == (45, 3, 336, 336)
    for b, n in enumerate(range(1, 10)):
        spans = enc.image_spans[b]
        assert len(spans) == n and all(end - start == 576 for start, end in spans)
        assert [lay.grid for lay in enc.layouts[b]] == [(24, 24)] * n
        assert [lay.num_tokens for lay in enc.layouts[b]] == [576] * n
        assert spans == sorted(spans) and all(s1[1] < s2[0] for s1, s2 in zip(spans, spans[1:], strict=False))
        for start, end in spans:
            assert bool((ids[b, start:end] == image_id).all())
            assert ids[b, start - 1] != image_id and ids[b, end] != image_id
        assert int((ids[b] == image_id).sum()) == 576 * n
        pad_id = tiny_llava.processor.tokenizer.pad_token_id
        assert enc.pad[b] == ids.shape[1] - int(enc.inputs["attention_mask"][b].sum())
        assert bool((ids[b, : enc.pad[b]] == pad_id).all()) and not bool(
            (ids[b, enc.pad[b] :] == pad_id).any()
        )
    assert enc.pad[-1] == 0  # the longest row is not padded; the others are, on the left
    assert all(p > 0 for p in enc.pad[:-1])


def test_qwen_spans_and_grids_for_1_to_9_images(tiny_qwen, noise_image):
    sizes = [
        (500, 300),
        (100, 900),
        (64, 64),
        (1000, 800),
        (333, 777),
        (900, 120),
        (256, 256),
        (40, 500),
        (640, 480),
    ]
    prompts = [
        PromptInput(f"p{n}", sequence_prompt(n), [noise_image(*sizes[i], i) for i in range(n)])
        for n in range(1, 10)
    ]
    enc = QWEN.encode(tiny_qwen.processor, prompts)
    ids, types = enc.inputs["input_ids"], enc.inputs["mm_token_type_ids"]
    grid_thw = enc.inputs["image_grid_thw"].tolist()
    assert len(grid_thw) == 45
    tokenizer = tiny_qwen.processor.tokenizer
    start_id, end_id = (
        tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    at = 0
    for b, n in enumerate(range(1, 10)):
        spans = enc.image_spans[b]
        assert len(spans) == n
        for i, (start, end) in enumerate(spans):
            t, h, w = grid_thw[at]
            at += 1
            assert t == 1 and enc.layouts[b][i].grid == (h // 2, w // 2)
            assert end - start == h * w // 4 <= 64
            assert ids[b, start - 1] == start_id and ids[b, end] == end_id
            assert bool((types[b, start:end] == 1).all())
        assert int(types[b].sum()) == sum(end - start for start, end in spans)
    # 500x300 -> smart_resize 168x280 -> 12x20 patches -> 6x10 tokens
    assert enc.layouts[0][0].grid == (6, 10)
    assert enc.layouts[1][1].grid == (23, 2)  # 100x900 -> 644x56


def test_spans_split_adjacent_images_and_candidates_extend_rows(tiny_llava, noise_image):
    image = noise_image(64, 64)
    prompts = [
        PromptInput("a", "<image><image>Compare.", [image, image]),
        PromptInput("b", "<image>x", [image]),
    ]
    enc = LLAVA.encode(tiny_llava.processor, prompts, candidates=[[65, 66, 67], []])
    assert [int(enc.inputs["input_ids"][b, enc.pad[b]]) for b in range(2)] == [tiny_llava.processor.tokenizer.bos_token_id] * 2
    assert int((enc.inputs["input_ids"] == tiny_llava.processor.tokenizer.bos_token_id).sum()) == 2  # one BOS per row
    first = enc.image_spans[0]
    assert first[0][1] == first[1][0] and [e - s for s, e in first] == [576, 576]
    assert enc.candidate_lengths == [3, 0]
    assert enc.inputs["input_ids"][0, -3:].tolist() == [65, 66, 67]
    assert enc.prompt_end[0] == enc.seq_len - 3 and enc.prompt_end[1] == enc.seq_len
    assert bool(enc.inputs["attention_mask"][0, enc.pad[0] :].all())


def test_image_spans_checks_counts():
    ids = torch.tensor([1, 9, 9, 2, 9, 9, 9, 3])
    assert image_spans(ids, 9, [2, 3]) == [(1, 3), (4, 7)]
    with pytest.raises(ValueError, match="expected"):
        image_spans(ids, 9, [2, 2])
    with pytest.raises(ValueError, match="contiguous"):
        image_spans(ids, 9, [3, 2])


def test_placeholder_count_must_match_images(tiny_qwen, noise_image):
    with pytest.raises(ValueError, match="placeholders"):
        QWEN.encode(tiny_qwen.processor, [PromptInput("x", "<image><image>", [noise_image(32, 32)])])


def test_a_hub_id_resolves_only_from_the_local_cache(tmp_path: Path, tiny_model_settings, monkeypatch):
    """A hub id in the cache resolves to its snapshot, without the network; an uncached one is unknown."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    ensure_builtin(BUILTINS["tiny-llava"], tiny_model_settings.data_dir)
    import shutil

    shutil.copytree(tiny_model_settings.data_dir / "models" / "tiny-llava", snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("org/tiny", tiny_model_settings) == snapshot
    assert load_model("org/tiny", tiny_model_settings).family is LLAVA
    with pytest.raises(UserError, match="not available here"):
        resolve_model("org/other", tiny_model_settings)
