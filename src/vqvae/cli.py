"""The ``vqvae`` command: parses arguments, then calls the library. No logic of its own."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .quantizers import VectorQuantize, codebook_usage

    torch.manual_seed(args.seed)
    vq = VectorQuantize(dim=args.dim, codebook_size=args.codebook_size, decay=0.8,
                        commitment_weight=1.0, kmeans_init=True)
    x = torch.randn(8, 1024, args.dim)
    print(f"{vq}\ninput x: {tuple(x.shape)}")
    for step in range(1, args.steps + 1):
        quantized, indices, loss = vq(x)
        usage = codebook_usage(indices, args.codebook_size)
        print(f"step {step}: loss {loss.item():.4f}  perplexity {usage.perplexity:.1f}  "
              f"used codes {usage.used_codes}/{args.codebook_size}")
    vq.eval()
    quantized, indices, _ = vq(x)
    print(f"quantized: {tuple(quantized.shape)}  indices: {tuple(indices.shape)} "
          f"{indices.dtype}  decode(indices) == quantized: "
          f"{torch.equal(vq.decode(indices), quantized)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqvae",
        description="Vector Quantized VAEs: quantizers, training and evaluation on MNIST.",
    )
    parser.add_argument("--version", action="version", version=f"vqvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="quantize random vectors and print codebook usage",
                          description="Quantize random vectors with VectorQuantize (k-means "
                                      "init, EMA codebook) and print loss and codebook usage.")
    demo.add_argument("--dim", type=int, default=256, help="vector size (default: 256)")
    demo.add_argument("--codebook-size", type=int, default=512, help="codes (default: 512)")
    demo.add_argument("--steps", type=int, default=5, help="training calls (default: 5)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
