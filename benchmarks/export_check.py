"""Exported programs against the eager model on real test images: how many images' codes the
ONNX encoder gets exactly right and the largest pixel difference of the ONNX decoder.

Trains a tiny run per (model, quantizer) on an MNIST subset (or takes existing run
directories), writes ``vqvae export``'s ONNX files, runs them with onnxruntime on the first
``--images`` test images, prints one table and writes JSON.

    python benchmarks/export_check.py           # mlp and conv with ours, rvq, rqvae, grvq
    python benchmarks/export_check.py --runs runs/mnist-ours --images 10000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vqvae.data import load_dataset
from vqvae.export import export_model
from vqvae.models import ModelConfig
from vqvae.rundir import load_model, read_config
from vqvae.train import TrainConfig, train

LAYOUT = {"ours": {}, "rvq": {"num_quantizers": 4}, "rqvae": {"num_quantizers": 4},
          "grvq": {"groups": 2, "num_quantizers": 2}}


def tiny_runs(models: list[str], quantizers: list[str], out: Path, epochs: int) -> list[Path]:
    runs = []
    for model in models:
        for quantizer in quantizers:
            run_dir = out / f"{model}-{quantizer}"
            extra = {"channels": 16} if model == "conv" else {}
            train(TrainConfig(epochs=epochs, out_dir=str(run_dir), train_subset=2000,
                              test_subset=200, batch_size=100, progress=False),
                  ModelConfig(model=model, quantizer=quantizer, **LAYOUT[quantizer], **extra))
            runs.append(run_dir)
    return runs


def check(run_dir: Path, count: int) -> dict:
    model = load_model(run_dir)
    train_config, _ = read_config(run_dir)
    test = load_dataset(train_config.dataset, "test", train_config.data_dir, progress=False)
    images = test.as_batch()[:count]  # (N, C, H, W) in [0, 1]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = export_model(model, tmp, "onnx")
        seconds = time.perf_counter() - start
        encode = ort.InferenceSession(str(paths["encode"]))
        decode = ort.InferenceSession(str(paths["decode"]))
        (codes,) = encode.run(None, {"images": images.numpy()})
        (decoded,) = decode.run(None, {"codes": codes})
    expected = model.encode(images).numpy()
    same = (codes == expected).reshape(len(images), -1)
    reference = model.decode(torch.from_numpy(codes)).numpy()
    return {"run": str(run_dir), "model": model.config.model,
            "quantizer": model.config.quantizer, "images": len(images),
            "images_codes_equal": int(same.all(1).sum()),
            "codes_equal": int(same.sum()), "codes": int(same.size),
            "max_image_difference": float(np.abs(decoded - reference).max()),
            "export_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, nargs="*", help="run directories to check "
                        "(default: train tiny ones)")
    parser.add_argument("--models", default="mlp,conv")
    parser.add_argument("--quantizers", default="ours,rvq,rqvae,grvq")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/export-check"))
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/export_check.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = args.runs or tiny_runs(args.models.split(","), args.quantizers.split(","),
                                  args.out_dir, args.epochs)
    rows = [check(run, args.images) for run in runs]
    print(f"\n{'model':6} {'quantizer':9} {'images':>6} {'codes equal':>14} "
          f"{'images equal':>12} {'max |Δpixel|':>12} {'export s':>8}")
    for r in rows:
        print(f"{r['model']:6} {r['quantizer']:9} {r['images']:6d} "
              f"{r['codes_equal']:7d}/{r['codes']:<6d} {r['images_codes_equal']:12d} "
              f"{r['max_image_difference']:12.2e} {r['export_seconds']:8.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
