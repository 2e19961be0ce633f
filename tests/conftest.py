"""Shared fixtures: tiny models of real architectures and small datasets, all built offline.

Everything runs in one pytest process (importing the stack costs seconds), with the hub switched off.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402

from vlmtune.data.synthetic import write_shapes_dataset  # noqa: E402
from vlmtune.models.tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Build each tiny family once per session: `tiny_model_dir("llava")` returns its folder."""
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = str(build_tiny_model(family, tmp_path_factory.mktemp(f"tiny_{family}")))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """The coloured-shapes dataset (train.csv / validation.csv with relative image paths)."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=300, n_eval=60, seed=0)


@pytest.fixture
def online(monkeypatch):
    """This process as a user's with a network would be: huggingface_hub's and datasets' offline mode off
    (both read it once, at import). For code that fetches from a local test server (image URLs)."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
