"""A process of a multi-process test run (gloo, CPU), started by tests/test_distributed.py.

    python distributed_worker.py quantizer OUT_DIR     # steps of VectorQuantize on fixed batches
    python distributed_worker.py train OUT_DIR [ARGS]  # vqvae.train on an MNIST subset

Rank and world size come from the usual torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT). With WORLD_SIZE=1 the same code is the one-process reference.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

GLOBAL_BATCH = 96
STEPS = 6


def global_batches(dim: int) -> list[torch.Tensor]:
    """The same global batches in every process: clustered data, so codes die and restart."""
    generator = torch.Generator().manual_seed(123)
    centres = torch.randn(5, dim, generator=generator, dtype=torch.float64) * 4
    batches = []
    for _ in range(STEPS):
        which = torch.randint(5, (GLOBAL_BATCH,), generator=generator)
        noise = torch.randn(GLOBAL_BATCH, dim, generator=generator, dtype=torch.float64)
        batches.append(centres[which] + 0.3 * noise)
    return batches


def run_quantizer(out_dir: Path) -> None:
    from vqvae import VectorQuantize

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=16, decay=0.7, kmeans_init=True, kmeans_iters=5,
                        threshold_ema_dead_code=1.5).double().train()
    states = []
    for batch in global_batches(4):
        shard = batch.tensor_split(world)[rank]
        vq(shard)
        states.append({"codebook": vq.codebook.clone(),
                       "cluster_size": vq.cluster_size.clone()})
    torch.save(states, out_dir / f"quantizer-{world}-{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def run_train(out_dir: Path, extra: list[str]) -> None:
    from vqvae.models import ModelConfig
    from vqvae.train import TrainConfig, train

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    epochs = int(extra[0]) if extra else 1
    config = TrainConfig(epochs=epochs, batch_size=64, train_subset=640, test_subset=200,
                         progress=False, out_dir=str(out_dir / f"run-{world}"), precision="fp32",
                         dist_timeout_seconds=30)
    model_config = ModelConfig(quantizer_options={"decay": 0.8, "kmeans_init": True,
                                                  "threshold_ema_dead_code": 1.0})
    run = train(config, model_config)
    torch.save(run.model.state_dict(), out_dir / f"model-{world}-{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "quantizer":
        run_quantizer(out)
    else:
        run_train(out, sys.argv[3:])
