"""Triton kernels, installed as `streamq.kernels` (a top-level `kernels` would clash with Hugging Face's package)."""
