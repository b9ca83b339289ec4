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


#: At most this many pytest-xdist workers for ``-n auto``: past it the few long tests (the
#: notebooks, the distributed runs), not the number of workers, set the suite's wall time.
MAX_AUTO_WORKERS = 8


def _usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset
    narrow), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which may not be installed
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per usable core. pytest-xdist's own count is the physical cores
    (through psutil, which ipykernel brings in), which on a 2-vCPU virtual machine can be 1."""
    return max(1, min(MAX_AUTO_WORKERS, _usable_cores()))


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist (``-n N``) each worker gets its share of the cores: N processes at
    torch's default of one thread per core would each spin waiting for cores the others hold.
    The same goes for the processes the tests start (the CLI, torchrun, notebook kernels),
    which read OMP_NUM_THREADS. Without xdist, or with OMP_NUM_THREADS already set, nothing
    changes."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not os.environ.get("PYTEST_XDIST_WORKER") or workers < 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, _usable_cores() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_the_cores_among_workers()


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist the tests marked slow go first (in their order), the many short ones
    after: a worker that draws a long test near the end would otherwise leave the others idle
    until it finishes. Every worker collects, and sorts, the same list. Without xdist the order
    stays the files' own."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
