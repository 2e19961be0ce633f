"""Tiny, randomly initialised models of real VLM architectures, built offline (see `common`)."""

from .common import BUILDERS, QWEN_TEMPLATE, _qwen_vl_processor, build_tiny_model

__all__ = ["BUILDERS", "QWEN_TEMPLATE", "_qwen_vl_processor", "build_tiny_model"]
