"""Shared test set-up: real MNIST comes from a local copy, never from the network."""

import os
import pickle
from pathlib import Path

# Triton reads this when it is first imported, and other test modules (torch.compile, the
# kernels' custom ops) can import it before tests/test_triton_search.py gets to set it. On a
# machine without a GPU the interpreter is the only way Triton kernels run at all.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

if not os.environ.get("VQVAE_DATA_DIR") and SHARED_MNIST.is_dir():
    os.environ["VQVAE_DATA_DIR"] = str(SHARED_MNIST)


def _mnist_available() -> bool:
    from vqvae.data import DATASETS, find_dataset_dir

    return find_dataset_dir(DATASETS["mnist"]) is not None


requires_mnist = pytest.mark.skipif(
    not _mnist_available(),
    reason="MNIST not found locally: set VQVAE_DATA_DIR (tests never download)")


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread beats two, and far more so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def state(module: torch.nn.Module) -> dict:
    """A copy of every parameter and buffer of ``module``."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def forbid_pickle(monkeypatch) -> None:
    """Make every pickle load (``pickle``'s and ``torch.load``) fail the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)


@pytest.fixture(autouse=True)
def _fresh_compile_caches():
    """Every test starts and ends with dynamo's caches empty: its recompile limit counts the
    graphs of a function across the whole process, so tests compiling many configurations of one
    quantizer would otherwise exhaust it for the tests after them. Always, not only after tests
    seen to trace: dynamo's frame counters miss ``fullgraph=True`` compiles, and a reset with
    nothing cached takes microseconds."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
