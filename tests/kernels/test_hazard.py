"""Our top-level `kernels` package shares its name with Hugging Face's `kernels` (PyPI); transformers probes for it."""
from transformers.utils import import_utils

import kernels


def test_transformers_does_not_take_our_kernels_for_hf_kernels():
    import_utils.is_kernels_available.cache_clear() if hasattr(import_utils.is_kernels_available, "cache_clear") else None
    assert kernels.__file__.startswith(str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert not import_utils.is_kernels_available()


def test_building_and_running_a_model_ignores_our_kernels(tiny_model):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model)  # would try hub kernels if it believed in them
    assert model is not None
