"""LLaVA-1.5 (`LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf).

Every image becomes 576 tokens: a 24x24 grid of 14 px CLIP patches of a 336x336 input, CLS dropped.

Image fitting. llava-hf/llava-1.5-7b-hf ships a `CLIPImageProcessor` that resizes the shortest edge
to 336 and centre-crops 336x336: the sides of a wide image are cut off (a 1x3 grid collage keeps 6 % /
100 % / 5 % of its cells). LLaVA-1.5 was trained, and MIA-DPO's official code generates and trains,
with every image first padded to a square with the processor's mean colour ("expand2square",
`image_aspect_ratio="pad"`). `fit_images` does exactly that before any processor sees an image, so the
processor's resize is then a plain scale, its crop a no-op, and generation, the attention pass, the
exported pairs and training all see the same square (the export stores it, so a stock processor trains
on it correctly). `token_layouts` still follows whatever the processor does (a `LlavaImageProcessor`
with `do_pad`, a crop), which on a square input is the identity map.

Chat template. The family's one conversation format is LLaVA-1.5's own training format, vicuna_v1
(its system prompt, `USER: ... ASSISTANT: ...</s>`), with each image where the prompt puts it and the
BOS written by the template. llava-hf's shipped template renders all of a turn's images first
(`<image>\n<image>\n... Image1: Image2: In Image2, ...`), which would cut MIA-DPO's labels off their
images; the official code generates with `llava_v0` but trains with `vicuna_v1`: one template for both
is what makes the rejected answers the model's own answers to the prompt it is trained on.
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
from workers.models.builtin import BuiltinModel, byte_level_tokenizer

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# vicuna_v1 as LLaVA's `conv_vicuna_v1` writes it (SeparatorStyle.TWO, sep " ", sep2 "</s>"):
#   <s>{system} USER: {user} ASSISTANT: {assistant}</s>USER: {user} ASSISTANT:
# with a message's image parts rendered as `<image>` where they stand among its text parts.
VICUNA_V1_TEMPLATE = (
    "{{- '<s>' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- system + ' ' -}}"
    "{%- for message in turns -%}"
    "{{- 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- ' ' if message['role'] == 'user' else '</s>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
# The chat template llava-hf/llava-1.5-7b-hf ships (all images of a turn first, then its text): what
# the built-in `tiny-llava-hf` saves, so the tests see a checkpoint whose own template is the wrong one.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    chat_template = VICUNA_V1_TEMPLATE

    def fit_images(
        self, processor: Any, images: Sequence[Image.Image]
    ) -> tuple[list[Image.Image], list[tuple[int, int]]]:
        """Each image padded to a square with the processor's mean colour, centred (LLaVA's expand2square)."""
        fill = pad_colour(processor.image_processor)
        out, offsets = [], []
        for image in images:
            padded, offset = expand2square(image, fill)
            out.append(padded)
            offsets.append(offset)
        return out, offsets

    def load_model(self, path: str | Path, **kwargs: Any) -> torch.nn.Module:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path, **kwargs)

    def load_processor(self, path: str | Path, **kwargs: Any) -> Any:
        from transformers import AutoProcessor

        return self.prepare_processor(AutoProcessor.from_pretrained(path, **kwargs))

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



def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """`image` centred on a square of colour `fill` (LLaVA's expand2square), and where its (0, 0) went."""
    width, height = image.size
    if width == height:
        return image, (0, 0)
    side = max(width, height)
    offset = (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, offset)
    return square, offset


def pad_colour(image_processor: Any) -> tuple[int, int, int]:
    """The processor's mean colour in 0..255, truncated as LLaVA's `tuple(int(x*255) for x in image_mean)`."""
    mean = image_processor.image_mean
    if isinstance(mean, int | float):
        mean = [mean] * 3
    r, g, b = (int(float(x) * 255) for x in mean)
    return (r, g, b)


def build_tiny_llava(path: Path, seed: int, chat_template: str = VICUNA_V1_TEMPLATE) -> None:
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
        chat_template=chat_template,
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
SHAPES_LLAVA_DIR = Path(__file__).parent / "shapes_llava"  # package data: weights (fp16), processor, training.json
BUILTINS = (
    BuiltinModel(
        "tiny-llava",
        FAMILY.name,
        "LLaVA-1.5 architecture, real image geometry (336 px, 576 tokens), tiny random weights",
        build=build_tiny_llava,
    ),
    BuiltinModel(
        "tiny-llava-hf",
        FAMILY.name,
        "tiny-llava saved as llava-hf ships LLaVA-1.5: centre-cropping CLIP processor, images-first chat template",
        build=lambda path, seed: build_tiny_llava(path, seed, chat_template=LLAVA_HF_TEMPLATE),
    ),
    BuiltinModel(
        "shapes-llava",
        FAMILY.name,
        "LLaVA-1.5 architecture trained on the sample generator's `single` style (colour and shape of one "
        "large shape, one-word answers) plus multi-image prompts answered about a random image: it answers "
        "single-image prompts and confuses images on multi-image ones (scripts/train_shapes_model.py)",
        packaged=SHAPES_LLAVA_DIR,
    ),
)
