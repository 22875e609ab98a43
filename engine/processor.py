"""A model's own processor (tokenizer + image processor + chat template), as the pipeline and the parity check use
it: loaded from the model's folder (on a machine without torchvision too), and a one-image prompt turned into
token ids and the processor's other outputs."""
from __future__ import annotations

import functools

import numpy as np

TEXT_KEYS = ("input_ids", "attention_mask", "labels")  # PaliGemma's processor returns training labels too


@functools.lru_cache(maxsize=4)
def load_processor(model_path: str, trust_remote_code: bool = False):
    """The checkpoint's own processor. Without torchvision, a processor class with a video processor (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL...; their video processors need torchvision) is loaded
    without it: the pipeline has images only. The image processor is transformers' PIL one then, as
    AutoImageProcessor picks it by itself when torchvision is missing."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        cls = _saved_processor_class(model_path)
        if getattr(type(cls), "is_dummy", False) and cls.__name__ in PIL_PROCESSORS:
            cls = pil_processor_class(cls.__name__)
        if cls is not None and (image_only_processor_class(cls) is not cls or cls.__name__ in PIL_PROCESSORS):
            return image_only_processor_class(cls).from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)


# processors whose module imports a torchvision image processor for one helper that the PIL image processor's
# module defines too (the same function): {class: (its module, {torchvision module: PIL module})}
PIL_PROCESSORS = {
    "PixtralProcessor": ("transformers.models.pixtral.processing_pixtral",
                         {"transformers.models.pixtral.image_processing_pixtral":
                          "transformers.models.pixtral.image_processing_pil_pixtral"}),
}


@functools.cache
def pil_processor_class(name: str):
    """The processor class `name` (one of PIL_PROCESSORS) imported without torchvision: its module is imported with
    the torchvision image processor's module standing for the PIL one's while it imports (Pixtral's processor
    takes one size helper from it, defined identically in both). With torchvision, transformers' own class."""
    import importlib
    import sys

    import transformers
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return getattr(transformers, name)
    module_name, stand_ins = PIL_PROCESSORS[name]
    if module_name not in sys.modules:
        saved = {k: sys.modules.get(k) for k in stand_ins}
        try:
            for torchvision_module, pil_module in stand_ins.items():
                sys.modules[torchvision_module] = importlib.import_module(pil_module)
            importlib.import_module(module_name)
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    return getattr(sys.modules[module_name], name)


def _saved_processor_class(model_path: str):
    """The processor class a checkpoint names (processor_config.json, preprocessor_config.json or
    tokenizer_config.json, as AutoProcessor looks for it), or its model type's; None when neither is found (then
    AutoProcessor tries, and says what is wrong)."""
    import json

    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name
    from transformers.utils import cached_file

    try:
        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
            file = cached_file(model_path, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
            if file:
                with open(file, encoding="utf-8") as f:
                    class_name = json.load(f).get("processor_class")
                if class_name:
                    return processor_class_from_name(class_name)
        return PROCESSOR_MAPPING.get(type(AutoConfig.from_pretrained(model_path)))
    except (OSError, ValueError):  # no such model, no config, a model type transformers does not know...
        return None


# processors whose own apply_chat_template only adds the video processor's frame sampling defaults (num_frames,
# fps) before the common one: without a video processor, the common one renders the same image prompt
TEMPLATE_READS_VIDEO_PROCESSOR = {"SmolVLMProcessor"}


@functools.cache
def image_only_processor_class(cls):
    """`cls` (a transformers processor class) without its video processor, when it has one: it loads the image
    processor and tokenizer as `cls` does, and saves under `cls`'s name, so what it saves loads with `cls`.
    It processes no videos (transformers ignores `videos` given to a processor without a video processor;
    the pipeline gives none)."""
    if getattr(type(cls), "is_dummy", False) or not hasattr(cls, "get_attributes"):
        return cls  # a placeholder for a class whose own imports are missing: AutoProcessor says which
    every = cls.get_attributes()
    kept = [a for a in every if "video" not in a]
    if kept == every:
        return cls

    class ImageOnly(cls):
        @classmethod
        def get_attributes(klass):
            return list(kept)

        @classmethod
        def get_processor_dict(klass, *args, **kwargs):
            processor_dict, rest = super().get_processor_dict(*args, **kwargs)
            return {k: v for k, v in processor_dict.items() if k in kept or k not in every}, rest

        @classmethod
        def _get_arguments_from_pretrained(klass, *args, **kwargs):
            loaded = dict(zip(kept, super()._get_arguments_from_pretrained(*args, **kwargs)))
            return [loaded.get(a) for a in every]  # None in the video processor's place, as cls(...) takes it

    if cls.__name__ in TEMPLATE_READS_VIDEO_PROCESSOR:
        from transformers.processing_utils import ProcessorMixin

        ImageOnly.apply_chat_template = ProcessorMixin.apply_chat_template
    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    ImageOnly.__module__ = cls.__module__
    ImageOnly.__doc__ = f"{cls.__name__} without its video processor (images only; no torchvision)."
    return ImageOnly


def _is_processor(processor, class_name: str) -> bool:
    return any(c.__name__ == class_name for c in type(processor).__mro__)


def chat_text(processor, prompt: str) -> str:
    """The text given to the processor with one image: the model's chat template with an image then the prompt.
    Florence-2 and PaliGemma have no chat template and lay out the image tokens themselves: Florence-2 puts its
    image token and <s> before any text (so the text carries none); PaliGemma wants one <image> before the
    prompt, then puts <bos> after the image tokens and a newline after the prompt."""
    if _is_processor(processor, "Florence2Processor"):
        return prompt
    if _is_processor(processor, "PaliGemmaProcessor"):
        return f"{processor.image_token}{prompt}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{getattr(processor, 'image_token', '<image>')}\n{prompt}"


def synthetic_image(width: int = 96, height: int = 80):
    """A fixed image with structure in both axes (so an image-blind forward would show)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255) // width, (y * 255) // height, ((x // 8 + y // 8) % 2) * 255], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def check_processor(model_path: str, trust_remote_code: bool = False) -> None:
    """Refuse (ValueError, one line) a model whose processor cannot be loaded here, or fails on a one-image
    prompt: every row of a job would fail the same way."""
    from engine.request import one_line

    try:
        processor = load_processor(model_path, trust_remote_code)
    except Exception as e:  # noqa: BLE001 - whatever stops it would stop every row
        raise ValueError(f"its processor cannot be loaded: {one_line(e)}") from None
    try:
        encode(processor, "Describe the picture in one sentence.", synthetic_image())
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"its processor fails on a one-image prompt, as it would on every row: {one_line(e)}"
                         ) from None


def encode(processor, prompt: str, image) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A one-image prompt's token ids (int64) and the processor's other outputs (image tensors, token types)."""
    enc = processor(text=[chat_text(processor, prompt)], images=[image], return_tensors="np")
    ids = np.asarray(enc["input_ids"][0], dtype=np.int64)
    return ids, {k: np.asarray(v) for k, v in enc.items() if k not in TEXT_KEYS}
