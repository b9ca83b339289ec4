"""Shared test set-up: real MNIST comes from a local copy, never from the network."""

import os
from pathlib import Path

import pytest

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

if not os.environ.get("VQVAE_DATA_DIR") and SHARED_MNIST.is_dir():
    os.environ["VQVAE_DATA_DIR"] = str(SHARED_MNIST)


def _mnist_available() -> bool:
    from vqvae.data import DATASETS, find_dataset_dir

    return find_dataset_dir(DATASETS["mnist"]) is not None


requires_mnist = pytest.mark.skipif(
    not _mnist_available(),
    reason="MNIST not found locally: set VQVAE_DATA_DIR (tests never download)")
