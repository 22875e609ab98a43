"""vLLM's CPU build on a machine without a working torchvision (PyPI's is a CUDA build that cannot load here):
transformers' PIL image path instead. Only module loading changes; no computation of vLLM's or the model's does.

Put on PYTHONPATH for the peer venv's processes only (benchmarks/peer_vllm.py and vLLM's own subprocesses):
- `transformers.models.qwen2_vl.image_processing_qwen2_vl` (the torchvision image processor, which vLLM imports
  `smart_resize` from) is the PIL module, whose `Qwen2VLImageProcessorPil` it names `Qwen2VLImageProcessor`;
- the video processor (torchvision only) is an empty stand-in: the benchmark sends images only.
Nothing here concerns the model: the shipped pair has Qwen2.5-VL's own tokens and chat template, as vLLM expects.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import typing


def _pil_qwen2_vl(module):
    pil = importlib.import_module("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
    module.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil


class NoVideo(dict):
    """The video processor's place in an images-only processor: it processes nothing and accepts no kwargs (an
    empty dict, so that it serialises as one)."""
    class valid_kwargs(typing.TypedDict):  # noqa: N801 (named as transformers' processors name theirs)
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("this vLLM venv has no torchvision: images only")


def _no_video_processor(module):
    module.AutoVideoProcessor.from_pretrained = classmethod(lambda cls, *a, **k: NoVideo())


def _video_may_be_none(module):
    check = module.ProcessorMixin.check_argument_for_proper_class

    def checked(self, name, arg):
        return None if isinstance(arg, NoVideo) else check(self, name, arg)

    module.ProcessorMixin.check_argument_for_proper_class = checked


REPLACED = {"transformers.models.qwen2_vl.image_processing_qwen2_vl": _pil_qwen2_vl}
PATCHED = {"transformers.models.auto.video_processing_auto": _no_video_processor,
           "transformers.processing_utils": _video_may_be_none}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in REPLACED:
            return importlib.util.spec_from_loader(name, _Loader(None, REPLACED[name]))
        if name in PATCHED:
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            spec.loader = _Loader(spec.loader, PATCHED[name])
            return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, after):
        self.inner, self.after = inner, after

    def create_module(self, spec):
        return self.inner.create_module(spec) if self.inner else None

    def exec_module(self, module):
        if self.inner:
            self.inner.exec_module(module)
        self.after(module)


sys.meta_path.insert(0, _Finder())
