"""Shared pytest setup: GPU tests skip without CUDA, and nothing may reach the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Any hub access in a test is a bug: make huggingface_hub fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def reference_dir() -> Path | None:
    """The shared reference folder (key manifests, camera rig), or None where this checkout has none."""
    candidates = [os.environ.get("GEN3D_REFERENCE_DIR"), REPO.parent / "shared" / "reference", REPO / "shared" / "reference"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use one CPU thread: the models are tiny, and on a busy machine OpenMP spinning between threads made
    them up to 100x slower. Results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Tiny random weights in the authors' layout (tiny_weights.write_official_folder), one folder per module."""
    from tiny_weights import write_official_folder

    return write_official_folder(tmp_path_factory.mktemp("weights"))


@pytest.fixture
def tiny_3d_config(monkeypatch) -> None:
    """The authors' layout stores no 3D-model config and the scripts load the official size: point them at tiny
    (modules that run the scripts use it for every test: ``pytestmark = pytest.mark.usefixtures(...)``)."""
    from tiny_weights import use_tiny_3d_config

    use_tiny_3d_config(monkeypatch)
