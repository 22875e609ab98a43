"""specray's compute kernels: each a plain torch reference plus a Triton implementation.

Not Hugging Face's `kernels` package (same import name): this package has no __version__ and its
distribution is `specray`, so transformers' probe for HF kernels finds no viable version and ignores it.
"""
