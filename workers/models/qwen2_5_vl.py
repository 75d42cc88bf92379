"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

The image processor resizes each image to (h', w'), multiples of patch_size x merge_size chosen by
`smart_resize` (aspect kept, pixel count between min and max), cuts it into patch_size patches,
and the vision tower merges merge_size x merge_size patches into one language-model token. So an
image gives `image_grid_thw = (1, h'/patch, w'/patch)` and (h'/patch/merge) x (w'/patch/merge)
tokens, row-major; the map from the original image is a pure scale (no crop, no pad).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from workers.models.base import ModelFamily, TokenLayout
from workers.models.builtin import BuiltinModel, byte_level_tokenizer

# The family's one conversation format: Qwen2.5-VL's own chatml template reduced to what the pipeline
# uses (the default system turn, each image where it stands, no vision ids); no BOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without its video processor.

    The stock processor requires a video processor, whose base class needs torchvision; the
    pipeline only uses images, so this one takes the image processor (PIL backend is fine) and the
    tokenizer and otherwise behaves the same. It loads from a real Qwen2.5-VL checkpoint too.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any
    ):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class Qwen2_5_VLFamily(ModelFamily):
    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    chat_template = CHAT_TEMPLATE
    sequence_keys: ClassVar[dict[str, int]] = {"attention_mask": 0, "mm_token_type_ids": 0}

    def load_model(self, path: str | Path, **kwargs: Any) -> torch.nn.Module:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, **kwargs)

    def load_processor(self, path: str | Path, **kwargs: Any) -> Any:
        return self.prepare_processor(Qwen2_5_VLImageProcessor.from_pretrained(path, **kwargs))

    def image_token_id(self, processor: Any) -> int:
        return int(processor.image_token_id)

    def placeholder_token_ids(self, processor: Any) -> list[int]:
        return [int(processor.image_token_id), int(processor.video_token_id)]

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        # 3-D rope positions: the model derives them from input_ids, mm_token_type_ids, the grids
        # and the attention mask (left padding aware), exactly as `generate` does.
        return None

    def token_layouts(
        self, processor: Any, image_inputs: dict[str, Any], images: Sequence[Image.Image]
    ) -> list[TokenLayout]:
        image_processor = processor.image_processor
        patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
        layouts = []
        for image, (t, h, w) in zip(images, image_inputs["image_grid_thw"].tolist(), strict=True):
            if t != 1:
                raise ValueError(f"an image must have one temporal patch, got image_grid_thw {(t, h, w)}")
            width, height = image.size
            layouts.append(
                TokenLayout(
                    image_size=image.size,
                    rows=h // merge,
                    cols=w // merge,
                    cell=(float(patch * merge), float(patch * merge)),
                    scale=(w * patch / width, h * patch / height),
                    offset=(0.0, 0.0),
                )
            )
        return layouts



def build_tiny_qwen(path: Path, seed: int) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    tokenizer = byte_level_tokenizer(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    # The real patch (14) and merge (2) sizes; few pixels, so an image is 4 to 64 tokens.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4,
        max_pixels=28 * 28 * 64,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )
    processor = Qwen2_5_VLImageProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )

    def ids(token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert isinstance(token_id, int)
        return token_id

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,  # grouped-query attention, as the real model
            "max_position_embeddings": 8192,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "rope_theta": 1000000.0,
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.bos_token_id = ids("<|endoftext|>")
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    processor.save_pretrained(path)
    model.save_pretrained(path)


FAMILY = Qwen2_5_VLFamily()
BUILTINS = (
    BuiltinModel(
        "tiny-qwen2.5-vl",
        FAMILY.name,
        "Qwen2.5-VL architecture, real patch and merge sizes, few pixels per image, tiny random weights",
        build=build_tiny_qwen,
    ),
)
