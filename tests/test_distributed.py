"""Two processes (gloo, CPU) keep codebooks in sync and train the model a single process would."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import requires_mnist

WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.slow]  # every test starts processes (torchrun or workers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out: Path, world: int, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), mode, str(out), *extra],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]


def test_codebooks_stay_identical_and_equal_one_process(tmp_path):
    """k-means init, EMA steps and dead-code restarts: 2 processes == 1 process on the same
    global batches."""
    wait_all(launch("quantizer", tmp_path, 2) + launch("quantizer", tmp_path, 1))
    rank0 = torch.load(tmp_path / "quantizer-2-0.pt")
    rank1 = torch.load(tmp_path / "quantizer-2-1.pt")
    single = torch.load(tmp_path / "quantizer-1-0.pt")
    restarted = 0
    for step, (a, b, ref) in enumerate(zip(rank0, rank1, single, strict=True)):
        for key in ("codebook", "cluster_size"):
            assert torch.equal(a[key], b[key]), (step, key)  # bit-identical across processes
            torch.testing.assert_close(a[key], ref[key], rtol=1e-10, atol=1e-10)
        restarted += int((a["cluster_size"] == 1.5).sum())
    assert restarted > 0, "the data should have made some codes die and restart"


@requires_mnist
def test_two_processes_train_the_model_one_process_would(tmp_path):
    wait_all(launch("train", tmp_path, 2) + launch("train", tmp_path, 1))
    rank0 = torch.load(tmp_path / "model-2-0.pt")
    rank1 = torch.load(tmp_path / "model-2-1.pt")
    single = torch.load(tmp_path / "model-1-0.pt")
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], rtol=2e-4, atol=2e-5)
    # only rank 0 wrote a run directory, and it is complete
    assert (tmp_path / "run-2" / "checkpoint.pt").is_file()
    assert (tmp_path / "run-2" / "metrics.json").is_file()


@requires_mnist
def test_a_killed_process_ends_the_run_with_an_error(tmp_path):
    procs = launch("train", tmp_path, 2, "1000")
    deadline = time.time() + 120
    while not (tmp_path / "run-2" / "config.json").exists():  # training has started
        assert time.time() < deadline and procs[0].poll() is None
        time.sleep(0.2)
    time.sleep(2.0)
    procs[1].send_signal(signal.SIGKILL)
    start = time.time()
    try:
        procs[0].communicate(timeout=90)
    finally:
        procs[0].kill()
    assert procs[0].returncode not in (0, None)
    assert time.time() - start < 90


def processes_mentioning(text: str) -> list[int]:
    """Ids of the processes whose command line contains ``text`` (Linux's /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(
                    errors="replace"):
                pids.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return pids


@requires_mnist
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux's /proc")
def test_a_distributed_run_killed_after_an_epoch_resumes_to_the_same_model(tmp_path):
    """torchrun, 2 processes: SIGKILL after epoch 1's checkpoint, --resume, same weights."""
    args = ["--epochs", "3", "--train-subset", "3000", "--test-subset", "200",
            "--batch-size", "100", "--no-progress"]

    def torchrun(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", "2", "-m", "vqvae", "train", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))

    full = torchrun(*args, "--out-dir", str(tmp_path / "full"))
    _, err = full.communicate(timeout=240)
    assert full.returncode == 0, err[-3000:]

    cut = torchrun(*args, "--out-dir", str(tmp_path / "cut"))
    metrics = tmp_path / "cut" / "metrics.json"
    deadline = time.time() + 240
    while not (metrics.exists() and '"epoch": 1' in metrics.read_text()):
        assert time.time() < deadline and cut.poll() is None, cut.stderr.read()[-3000:]
        time.sleep(0.05)
    # the launcher and both workers (torchrun starts the workers in sessions of their own)
    for pid in processes_mentioning(str(tmp_path / "cut")):
        os.kill(pid, signal.SIGKILL)
    cut.communicate(timeout=60)
    assert '"epoch": 3' not in metrics.read_text()  # killed before the run ended

    resumed = torchrun("--resume", str(tmp_path / "cut"))
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    expected = torch.load(tmp_path / "full" / "checkpoint.pt")["model"]
    got = torch.load(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
