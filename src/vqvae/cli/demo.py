"""``vqvae demo``: quantize random vectors and print codebook usage."""

from __future__ import annotations

import argparse

from .common import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="quantize random vectors and print codebook usage",
                       description="A few training calls of our VectorQuantize on random "
                                   "vectors, with the loss and codebook usage of each.")
    p.add_argument("--dim", type=positive_int, default=256, help="(default: 256)")
    p.add_argument("--codebook-size", type=positive_int, default=512, help="(default: 512)")
    p.add_argument("--steps", type=positive_int, default=5, help="(default: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..quantizers import VectorQuantize, codebook_usage

    torch.manual_seed(args.seed)
    vq = VectorQuantize(dim=args.dim, codebook_size=args.codebook_size, kmeans_init=True)
    x = torch.randn(8, 1024, args.dim)
    print(f"{vq}\ninput x: {tuple(x.shape)}")
    for step in range(1, args.steps + 1):
        _, indices, loss = vq(x)
        usage = codebook_usage(indices, args.codebook_size)
        print(f"step {step}: loss {loss.item():.4f}  perplexity {usage.perplexity:.1f}  "
              f"used codes {usage.used_codes}/{args.codebook_size}")
    return 0
