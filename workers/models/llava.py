"""LLaVA-1.5 (`LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf).

Every image becomes 576 tokens: a 24x24 grid of 14 px CLIP patches of a 336x336 input, CLS dropped.
How the original image reaches those 336x336 pixels depends on the image processor's config:
llava-hf/llava-1.5-7b-hf ships a `CLIPImageProcessor` (resize the shortest edge to 336, then
centre-crop 336x336: the sides of a wide image are cut off); `LlavaImageProcessor` with
`do_pad=True` first pads the image to a square with the mean colour (the original LLaVA's "pad"
aspect mode). `token_layouts` follows whichever the checkpoint uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.models.base import ModelFamily, TokenLayout
from workers.models.tiny import byte_level_tokenizer

# Interleaves text and images in the order given, so `<image>` lands where the recipe put it, and
# renders the LLaVA-1.5 conversation format ("USER: ... ASSISTANT:").
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}ASSISTANT: {% else %}USER: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    tiny_name = "tiny-llava"

    def chat_text(self, processor: Any, prompt: str) -> str:
        # The LLaVA-1.5 format, written out: the llava-hf chat template renders all of a turn's
        # images before its text, which would move "Image2:<image>" away from its label.
        return f"USER: {prompt} ASSISTANT:"

    def load_model(self, path: str | Path, **kwargs: Any) -> torch.nn.Module:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path, **kwargs)

    def load_processor(self, path: str | Path, **kwargs: Any) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, **kwargs)

    def image_token_id(self, processor: Any) -> int:
        return int(processor.image_token_id)

    def token_layouts(
        self, processor: Any, image_inputs: dict[str, Any], images: Sequence[Image.Image]
    ) -> list[TokenLayout]:
        pixel_values = image_inputs["pixel_values"]
        leading = int(processor.num_additional_image_tokens)
        if processor.vision_feature_select_strategy == "default":
            leading -= 1
        layouts = []
        for i, image in enumerate(images):
            layout = pixel_layout(processor.image_processor, image.size, int(processor.patch_size), leading)
            height, width = pixel_values[i].shape[-2:]
            if (layout.rows, layout.cols) != (height // processor.patch_size, width // processor.patch_size):
                raise ValueError(
                    f"image processor {type(processor.image_processor).__name__} produced {width}x{height} "
                    f"pixels, but its config predicts a {layout.cols}x{layout.rows} patch grid"
                )
            layouts.append(layout)
        return layouts

    def build_tiny(self, path: Path, seed: int) -> None:
        from transformers import (
            CLIPImageProcessorPil,
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        tokenizer = byte_level_tokenizer(
            ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            add_bos=True,
        )
        # The real model's geometry (336 px, 14 px patches -> 24x24 = 576 tokens), tiny widths.
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=TINY_CHAT_TEMPLATE,
        )

        def ids(token: str) -> int:
            token_id = tokenizer.convert_tokens_to_ids(token)
            assert isinstance(token_id, int)
            return token_id

        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                image_size=336,
                patch_size=14,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                projection_dim=32,
            ),
            text_config=LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=8192,
                bos_token_id=ids("<s>"),
                eos_token_id=ids("</s>"),
                pad_token_id=ids("<pad>"),
            ),
            image_token_index=ids("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration(config)
        model.generation_config.bos_token_id = ids("<s>")
        model.generation_config.eos_token_id = ids("</s>")
        model.generation_config.pad_token_id = ids("<pad>")
        processor.save_pretrained(path)
        model.save_pretrained(path)


def pixel_layout(
    image_processor: Any, image_size: tuple[int, int], patch: int, leading: int = 0
) -> TokenLayout:
    """Token layout of a CLIP-style image processor (optional pad to square, resize, centre crop)."""
    width, height = image_size
    pad_x = pad_y = 0
    if getattr(image_processor, "do_pad", False):
        if not hasattr(image_processor, "pad_to_square"):
            raise ValueError(f"{type(image_processor).__name__} with do_pad=True is not supported")
        side = max(width, height)
        # LlavaImageProcessor.pad_to_square: the image is centred on the long side's square.
        if width > height:
            pad_y = (side - height) // 2
        else:
            pad_x = (side - width) // 2
        width = height = side
    new_h, new_w = height, width
    if image_processor.do_resize:
        new_h, new_w = _resize_hw(image_processor.size, height, width)
    scale_x, scale_y = new_w / width, new_h / height
    out_h, out_w = new_h, new_w
    off_x = off_y = 0.0
    if image_processor.do_center_crop:
        crop = image_processor.crop_size
        out_h, out_w = int(_get(crop, "height")), int(_get(crop, "width"))
        pil = not _is_torchvision_backend(image_processor)
        off_y, off_x = _crop_offset(new_h, out_h, pil), _crop_offset(new_w, out_w, pil)
    return TokenLayout(
        image_size=image_size,
        rows=out_h // patch,
        cols=out_w // patch,
        cell=(float(patch), float(patch)),
        scale=(scale_x, scale_y),
        offset=(pad_x * scale_x + off_x, pad_y * scale_y + off_y),
        leading_tokens=leading,
    )


def _crop_offset(size: int, crop: int, pil: bool = True) -> float:
    """Where the resized image's edge lands in the crop (transformers' `center_crop`).

    Cropping cuts floor((size - crop) / 2) on the top/left in both backends; when the crop is
    larger, the PIL backend pads ceil(diff / 2) before the image and the torchvision one floor.
    """
    if size >= crop:
        return float(-((size - crop) // 2))
    return float(math.ceil((crop - size) / 2) if pil else (crop - size) // 2)


def _is_torchvision_backend(image_processor: Any) -> bool:
    from transformers.image_processing_backends import TorchvisionBackend

    return isinstance(image_processor, TorchvisionBackend)


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _resize_hw(size: Any, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the PIL backend's `resize` for this `size` (same helpers, same rounding)."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    shortest, longest = _get(size, "shortest_edge"), _get(size, "longest_edge")
    if shortest and longest:
        new_h, new_w = get_size_with_aspect_ratio((height, width), shortest, longest)
    elif shortest:
        shape_only = np.broadcast_to(np.uint8(0), (3, height, width))
        new_h, new_w = get_resize_output_image_size(
            shape_only, size=shortest, default_to_square=False, input_data_format=ChannelDimension.FIRST
        )
    elif _get(size, "max_height") and _get(size, "max_width"):
        new_h, new_w = get_image_size_for_max_height_width(
            (height, width), _get(size, "max_height"), _get(size, "max_width")
        )
    elif _get(size, "height") and _get(size, "width"):
        new_h, new_w = _get(size, "height"), _get(size, "width")
    else:
        raise ValueError(f"unsupported image processor size {size!r}")
    return int(new_h), int(new_w)


FAMILY = LlavaFamily()
