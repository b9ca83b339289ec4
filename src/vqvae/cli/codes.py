"""``vqvae reconstruct``, ``encode`` and ``decode``: images through a trained model, and its
codes as files."""

from __future__ import annotations

import argparse
from pathlib import Path

from .checks import IMAGE_SUFFIXES, check_input_files, check_out_dir, check_out_file
from .common import UsageError, add_image_sources, add_run_dir, load_run_model, source_images


def add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct test images or PNGs with a trained model",
                       description="Write a figure with the images above their "
                                   "reconstructions.")
    add_run_dir(p)
    add_image_sources(p)
    p.add_argument("--out", metavar="PNG", help="(default: RUN_DIR/reconstruct.png)")
    p.set_defaults(func=run_reconstruct)


def add_encode(sub) -> None:
    p = sub.add_parser("encode", help="turn images into codes (a JSON codes file)",
                       description="Encode test-set images or PNG files to their discrete "
                                   "codes.")
    add_run_dir(p)
    add_image_sources(p)
    p.add_argument("--out", required=True, metavar="CODES.json", help="codes file to write")
    p.set_defaults(func=run_encode)


def add_decode(sub) -> None:
    p = sub.add_parser("decode", help="turn a codes file back into images",
                       description="Decode a codes file (from vqvae encode, or a .npy integer "
                                   "array of shape (N, positions), (N, positions, depths) for a "
                                   "residual quantizer or (N, positions, groups, depths) for a "
                                   "grouped one) into images.")
    add_run_dir(p)
    p.add_argument("codes", metavar="CODES", help="codes file (.json or .npy)")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="a .png grid, or a directory for one PNG per image")
    p.set_defaults(func=run_decode)


def run_reconstruct(args: argparse.Namespace) -> int:
    from .. import plots
    from ..workflow import reconstruct

    out = check_out_file(args.out or Path(args.run_dir) / "reconstruct.png", IMAGE_SUFFIXES[:1])
    model = load_run_model(args.run_dir, args.device)
    images, _ = source_images(args, model)
    device = next(model.parameters()).device
    plots.image_rows([images, reconstruct(model, images.to(device))],
                     ["input", "reconstruction"], out)
    print(f"wrote {out}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from ..workflow import save_codes

    check_out_file(args.out)
    model = load_run_model(args.run_dir, args.device)
    images, sources = source_images(args, model)
    codes = model.encode(images.to(next(model.parameters()).device))
    out = save_codes(Path(args.out), codes, model.config, sources)
    shape = " × ".join(map(str, codes.shape[1:]))
    print(f"wrote {len(codes)} code arrays of {shape} codes to {out}")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from .. import plots
    from ..workflow import load_codes, write_png_images

    check_input_files([args.codes], "CODES")
    out = Path(args.out)
    if out.suffix:
        check_out_file(out, IMAGE_SUFFIXES[:1])
    else:
        check_out_dir(out)
    model = load_run_model(args.run_dir, args.device)
    try:
        codes, _ = load_codes(Path(args.codes), model.config)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    images = model.decode(codes.to(next(model.parameters()).device))
    if out.suffix.lower() == ".png":
        plots.image_grid(images, out, columns=min(len(images), 10))
        print(f"wrote {out}")
    else:
        paths = write_png_images(images, out, [f"{i:05d}.png" for i in range(len(images))])
        print(f"wrote {len(paths)} PNG files to {out}")
    return 0
