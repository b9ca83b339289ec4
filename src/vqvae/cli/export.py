"""``vqvae export``: a trained model as ONNX (or torch.export) programs that run without our
code: ``encode`` (images to codes) and ``decode`` (codes to images)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UsageError, add_run_dir, load_run_model


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a trained model's encoder and decoder as ONNX or torch.export files",
        description="Write encode.onnx (float32 images (N, C, H, W) in [0, 1] to int64 codes, "
                    "one row per image laid out as in the codes file of 'vqvae encode') and "
                    "decode.onnx (those codes to float32 images), with any batch size N, and "
                    "export.json describing them. --format torch writes torch.export archives "
                    "(encode.pt2, decode.pt2) instead, loadable with torch.export.load.")
    add_run_dir(p)
    p.add_argument("--format", choices=("onnx", "torch"), default="onnx",
                   help="(default: onnx; needs pip install 'vqvae[export]')")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write to")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    import importlib.util

    from ..export import export_model

    if args.format == "onnx":
        missing = [name for name in ("onnx", "onnxscript")
                   if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(f"--format onnx needs {' and '.join(missing)}: "
                             "pip install 'vqvae[export]'")
    model = load_run_model(args.run_dir, args.device)
    paths = export_model(model, Path(args.out), args.format)
    codes = " × ".join(map(str, model.config.code_shape))
    print(f"wrote {paths['encode']} (images -> {codes} codes), {paths['decode']} (codes -> "
          f"images) and {paths['meta']}")
    return 0
