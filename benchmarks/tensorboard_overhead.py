"""What ``--tensorboard`` adds to an epoch: the logger's call against the evaluation every epoch
already runs.

The logger (``vqvae.tensorboard_log.TrainingLogger``) encodes the test set once more for the
code histogram and reconstructs a few images; the scalars cost nothing. Both run on the full
MNIST test set with the default model, taking turns in one process, so machine noise hits both
alike; the table gives median seconds and the logger's ratio to the evaluation.

    python benchmarks/tensorboard_overhead.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vqvae.data import load_dataset
from vqvae.models import VQVAE, ModelConfig
from vqvae.tensorboard_log import TrainingLogger
from vqvae.train import Data, Run, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/tensorboard_overhead.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    test = load_dataset("mnist", "test", progress=False).as_float().unsqueeze(1)
    model = VQVAE(ModelConfig()).eval()
    data = Data(train=test[:1], test=test, test_labels=None)
    metrics = {"epochs": [{"train_loss": 1.0, "test_mse": 0.1, "perplexity": 3.0,
                           "used_codes": 4}]}
    times: dict[str, list[float]] = {"evaluate": [], "tensorboard logger": []}
    with tempfile.TemporaryDirectory() as log_dir:
        logger = TrainingLogger(log_dir)
        logger(0, metrics, run=Run(Path(log_dir), model, metrics, data))  # opens the writer
        for step in range(args.rounds):
            start = time.perf_counter()
            evaluate(model, test)
            times["evaluate"].append(time.perf_counter() - start)
            start = time.perf_counter()
            logger(step + 1, metrics, run=Run(Path(log_dir), model, metrics, data))
            times["tensorboard logger"].append(time.perf_counter() - start)
        logger.close()
    base = statistics.median(times["evaluate"])
    rows = [{"what": name, "median_seconds": statistics.median(values),
             "ratio_to_evaluate": statistics.median(values) / base, "rounds": values}
            for name, values in times.items()]
    print(f"{test.shape[0]:,} test images, default model, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads\n")
    print("| per epoch | median s | × evaluate |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['what']} | {row['median_seconds']:.3f} | "
              f"{row['ratio_to_evaluate']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "test_images": test.shape[0],
                                     "threads": torch.get_num_threads()}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
