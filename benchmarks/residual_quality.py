"""Quality of residual quantization: test MSE against bits per image, ours and the library's.

Trains the course's MLP VQ-VAE on MNIST with 1, 2, 4 and 8 residual layers (16 positions ×
log2(512) = 9 bits per layer: 144, 288, 576 and 1152 bits per image; ``--model conv``: 49
positions, 441 bits per layer), once with our ResidualVQ
(``rvq``) and once with vector_quantize_pytorch's (``lucidrains-rvq``, the same settings), each
with ``vqvae compare``'s machinery (same seed, same data order), and prints one table. Each
``layers-L`` directory under ``--out-dir`` holds that comparison's runs, table and figure.

    python benchmarks/residual_quality.py                       # 10 epochs, the measurement
    python benchmarks/residual_quality.py --epochs 3 --layers 1,4 --quantizers rvq  # a pilot
    python benchmarks/residual_quality.py --model conv --dataset fashion-mnist --epochs 3 \
        --threads 1 --json benchmarks/results/residual_quality_conv_fashion-mnist.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from vqvae.models import ModelConfig
from vqvae.train import TrainConfig
from vqvae.workflow import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantizers", default="rvq,lucidrains-rvq")
    parser.add_argument("--layers", default="1,2,4,8")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", choices=("mlp", "conv"), default="mlp",
                        help="conv: 7×7 grid of codes, 441 bits per layer")
    parser.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, ...")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is faster for this "
                             "small model on a busy machine")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/residual-quality"))
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/residual_quality.json"))
    args = parser.parse_args()
    names = [n.strip() for n in args.quantizers.split(",") if n.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    depths = [int(n) for n in args.layers.split(",")]

    train_config = TrainConfig(epochs=args.epochs, seed=args.seed, device="cpu",
                               train_subset=args.train_subset, progress=False,
                               dataset=args.dataset)
    rows = []
    for layers in depths:
        out = args.out_dir / f"layers-{layers}"
        if out.exists():
            shutil.rmtree(out)  # a measurement starts from nothing
        start = time.perf_counter()
        model_config = ModelConfig(model=args.model, quantizer=names[0], num_quantizers=layers)
        result = compare(names, train_config, model_config, out)
        rows += [dict(r, layers=layers) for r in result]
        print(f"{layers} layer(s): {time.perf_counter() - start:.0f} s", flush=True)

    table = quality_table(rows, names, depths)
    print(f"\nTest MSE per pixel after {args.epochs} epochs ({args.model} VQ-VAE, {args.dataset}"
          f"{'' if args.train_subset is None else f', {args.train_subset} training images'}, "
          f"seed {args.seed}); in brackets, the MSE over the same quantizer's 1-layer MSE:\n")
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "model": args.model,
                                     "train": dataclasses.asdict(train_config),
                                     "threads": torch.get_num_threads(), "table": table},
                                    indent=2, default=str))
    print(f"\nwrote {args.json}")


def quality_table(rows: list[dict], names: list[str], depths: list[int]) -> str:
    by = {(r["quantizer"], r["layers"]): r for r in rows}
    header = ["layers", "bits / image"] + [f"{n} test MSE" for n in names] + \
        [f"{n} used codes" for n in names] + [f"{n} s / epoch" for n in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for layers in depths:
        cells = [str(layers), f"{by[(names[0], layers)]['bits_per_image']:g}"]
        for n in names:
            mse, base = by[(n, layers)]["test_mse"], by.get((n, min(depths)), {}).get("test_mse")
            cells.append(f"{mse:.5f}" + (f" ({mse / base:.2f}×)" if base else ""))
        cells += [f"{by[(n, layers)]['used_codes']:.1f}" for n in names]
        cells += [f"{by[(n, layers)]['seconds_per_epoch']:.1f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
