"""Writes the course notebooks (``*.ipynb`` beside this file) from the cells below, without outputs.

    python notebooks/make_notebooks.py          # rewrite them
    python notebooks/make_notebooks.py --check  # exit 1 if a committed notebook differs

The notebooks are generated so that the cells they share (data, the MLP model, the training loop,
the plots) are written once, and so that no output, execution count or machine-specific metadata
is ever committed. Edit this file, not the ``.ipynb`` files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


# ---------------------------------------------------------------------------- shared cells

BUDGET = md("""
### Budget

`VQVAE_NOTEBOOK_FAST=1` trains on a 6,400-image subset for one epoch (50 steps per model),
which is what the test suite runs: enough to check that everything works, not to look good.
Without it each model sees the full 60,000 training images several times; on a laptop CPU the
whole notebook takes a few minutes.
""")

SETUP = code("""
import os
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from vqvae import codebook_usage
from vqvae.data import load_dataset

FAST = os.environ.get("VQVAE_NOTEBOOK_FAST") == "1"
TRAIN_IMAGES = 6_400 if FAST else 60_000
TEST_IMAGES = 1_000 if FAST else 10_000
EPOCHS = 1 if FAST else EPOCHS_DEFAULT
BATCH_SIZE = 128
NUM_CODES, CODE_DIM, CODEBOOK_SIZE = 16, 16, 512  # 16 codes of 16 numbers, from 512 entries

# MNIST is found (or downloaded and checked) by the package: $VQVAE_DATA_DIR, then a cache
train_images = load_dataset("mnist", "train", progress=False).as_float()[:TRAIN_IMAGES]
test_images = load_dataset("mnist", "test", progress=False).as_float()[:TEST_IMAGES]
train_images, test_images = train_images.unsqueeze(1), test_images.unsqueeze(1)  # (N, 1, 28, 28)
print(f"{len(train_images)} training and {len(test_images)} test images, "
      f"{EPOCHS} epoch(s) per model, pixels in [{train_images.min():.0f}, "
      f"{train_images.max():.0f}]")
""")

MODEL_MD = md("""
### The model

The course's MLP: the encoder turns a 784-pixel image into 256 numbers, read as 16 vectors of
16; the quantizer replaces each vector by a codebook entry; the decoder maps the 16 entries back
to pixels. The quantizer is passed in, so the same model serves every layer tried here: all of
them take `(..., dim)` and return `quantized, indices, loss`.
""")

MODEL = code("""
class MLPVQVAE(nn.Module):
    def __init__(self, quantizer: nn.Module, hidden: int = 300, pixels: int = 28 * 28):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(pixels, hidden), nn.LeakyReLU(),
            nn.Linear(hidden, hidden), nn.LeakyReLU(),
            nn.Linear(hidden, NUM_CODES * CODE_DIM),
        )
        self.vq = quantizer
        self.decoder = nn.Sequential(
            nn.Linear(NUM_CODES * CODE_DIM, hidden), nn.LeakyReLU(),
            nn.Linear(hidden, hidden), nn.LeakyReLU(),
            nn.Linear(hidden, pixels), nn.Sigmoid(),
        )

    def encode(self, images):  # (B, 1, 28, 28) -> (B, 16, 16): one row per code
        return self.encoder(images.flatten(1)).view(-1, NUM_CODES, CODE_DIM)

    def decode_vectors(self, vectors):  # (B, 16, 16) -> (B, 1, 28, 28)
        return self.decoder(vectors.flatten(1)).view(-1, 1, 28, 28)

    def forward(self, images):
        quantized, indices, vq_loss = self.vq(self.encode(images))
        return self.decode_vectors(quantized), indices, vq_loss

    @torch.no_grad()
    def decode_codes(self, codes):  # (B, 16) integer codes -> images
        # The library calls the code lookup get_output_from_indices; our layers call it decode
        lookup = getattr(self.vq, "decode", None) or self.vq.get_output_from_indices
        return self.decode_vectors(lookup(codes))
""")

TRAIN = code("""
def train(model, epochs=EPOCHS, lr=1e-3, seed=0):
    \"\"\"Adam on reconstruction MSE + the quantizer's loss; returns the per-step MSE.\"\"\"
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    curve, start = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        for first in range(0, len(order), BATCH_SIZE):
            batch = train_images[order[first:first + BATCH_SIZE]]
            reconstruction, indices, vq_loss = model(batch)
            mse = F.mse_loss(reconstruction, batch)
            optimizer.zero_grad()
            # a residual stack returns one loss per depth, as the library's does: add them
            (mse + vq_loss.sum()).backward()
            optimizer.step()
            curve.append(mse.item())
        result = evaluate(model)
        print(f"epoch {epoch + 1}/{epochs}: test MSE {result['test MSE']:.5f}, "
              f"{result['codes used']} codes used, {time.perf_counter() - start:.0f} s")
    return curve


@torch.no_grad()
def evaluate(model, codebook_size=CODEBOOK_SIZE):
    \"\"\"Test MSE per pixel, and how many codebook entries the test images use.\"\"\"
    model.eval()
    reconstruction, indices, _ = model(test_images)
    usage = codebook_usage(indices, codebook_size)
    return {"test MSE": F.mse_loss(reconstruction, test_images).item(),
            "perplexity": usage.perplexity, "codes used": usage.used_codes}
""")

PLOTS = code("""
def show_rows(rows, labels, title):
    \"\"\"One row of images per tensor in ``rows`` (each (n, 1, 28, 28)).\"\"\"
    n = len(rows[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(0.9 * n, 1.0 * len(rows) + 0.4),
                             squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for c in range(n):
            axes[r, c].imshow(images[c, 0].cpu(), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center")
    fig.suptitle(title)
    plt.show()


@torch.no_grad()
def show_model(model, name, n=10, seed=0):
    \"\"\"Test digits and their reconstructions, then images decoded from random codes.\"\"\"
    model.eval()
    originals = test_images[:n]
    reconstructions, _, _ = model(originals)
    show_rows([originals, reconstructions], ["input", "output"], f"{name}: reconstructions")
    codes = torch.randint(0, CODEBOOK_SIZE, (n, NUM_CODES),
                          generator=torch.Generator().manual_seed(seed))
    show_rows([model.decode_codes(codes)], ["random"], f"{name}: uniformly random codes")
""")


def shared_cells(epochs_default: int) -> list:
    """What every notebook starts with: the budget, the data, the MLP model, the training loop
    and the plots, with ``epochs_default`` epochs per model in the full budget."""
    return [BUDGET, code(f"EPOCHS_DEFAULT = {epochs_default}"), SETUP, MODEL_MD, MODEL, TRAIN,
            PLOTS]


# ---------------------------------------------------------------------------- notebook 1

EXERCISE_1 = [
    md("""
# Exercise 1: a VQ-VAE on MNIST with `vector_quantize_pytorch`

A VQ-VAE is an autoencoder whose bottleneck is a short sequence of integers. The encoder
produces a few vectors per image; each vector is replaced by the nearest entry of a learned
table (the *codebook*), and only the entries' numbers (the *codes*) need to be kept. The decoder
sees the table entries, never the encoder's raw output, so whatever the decoder can draw, it
draws from codes.

Here the quantizer is the reference library's `VectorQuantize`. It keeps its codebook as an
exponential moving average of the vectors assigned to each entry (`decay=0.8`), so the only
loss it adds is the *commitment* term that keeps the encoder close to its chosen entries.
"""),
    *shared_cells(epochs_default=5),
    md("""
### Training with the library's layer

The settings are the course's: 512 entries of 16 numbers, EMA decay 0.8, commitment weight 1.
"""),
    code("""
from vector_quantize_pytorch import VectorQuantize

torch.manual_seed(0)
library_vq = VectorQuantize(dim=CODE_DIM, codebook_size=CODEBOOK_SIZE, decay=0.8,
                            commitment_weight=1.0)
model = MLPVQVAE(library_vq)
curve = train(model)
result = evaluate(model)
result
"""),
    code("""
plt.figure(figsize=(6, 3))
plt.semilogy(curve)
plt.xlabel("step")
plt.ylabel("training MSE per pixel")
plt.title("vector_quantize_pytorch layer")
plt.show()
"""),
    md("""
### What it learned

First row: test digits the model never trained on. Second row: what comes back after the
image is squeezed into 16 codes (16 × 9 = 144 bits, against 784 bytes of pixels).

The last row decodes 16 codes drawn uniformly at random. Each code is a valid table entry, but
the combinations the encoder actually produces are far from uniform, so random combinations
decode to blurry strokes rather than digits. Making digits needs a model of which codes go
together: that is the prior of the third notebook.
"""),
    code('show_model(model, "vector_quantize_pytorch")'),
    md("""
The codes an image gets are plain integers, one per row of the encoder's output:
"""),
    code("""
with torch.no_grad():
    model.eval()
    _, codes, _ = model(test_images[:3])
print(codes)  # (3, 16): 16 codes per image, each in [0, 512)
"""),
]

# ---------------------------------------------------------------------------- notebook 2

EXERCISE_2 = [
    md("""
# Exercise 2: writing the quantizer ourselves

This notebook builds the quantization layer by hand, checks it on a small worked example,
trains the course's MLP VQ-VAE with it, and then swaps in the project's `vqvae.VectorQuantize`,
which follows the same contract.
"""),
    md("""
## A worked example

Four codebook entries of 6 numbers, and a batch of 2 × 3 vectors to quantize. Each vector's
code is the row of the codebook it is closest to (Euclidean distance), found as the argmin over
the columns of the distance matrix.
"""),
    code("""
import torch

codebook = torch.tensor([
    [0.15801739, 0.71236613, 0.34401087, 0.31100241, 0.19731029, 0.75124264],
    [0.17008199, 0.76689422, 0.82562077, 0.17558232, 0.82136028, 0.84026041],
    [0.89155776, 0.92834241, 0.56760302, 0.72009988, 0.43676168, 0.94838489],
    [0.38546037, 0.75875292, 0.90014871, 0.17816013, 0.06095272, 0.69844905],
])
vectors = torch.tensor([
    [[0.16, 0.75, 0.81, 0.12, 0.81, 0.90],
     [0.41, 0.76, 0.82, 0.17, 0.01, 0.72],
     [0.15, 0.70, 0.33, 0.30, 0.21, 0.76]],
    [[0.50, 0.72, 0.35, 0.13, 0.98, 0.52],
     [0.61, 0.54, 0.73, 0.28, 0.76, 0.57],
     [0.67, 0.12, 0.36, 0.55, 0.73, 0.71]],
], requires_grad=True)  # (2, 3, 6)

distances = torch.cdist(vectors, codebook)  # (2, 3, 4): vector to every entry
codes = distances.argmin(dim=-1)            # (2, 3)
quantized = codebook[codes]                 # (2, 3, 6): the entries themselves
print(distances.detach().round(decimals=2))
print(codes)
assert codes.tolist() == [[1, 3, 0], [1, 1, 2]]
"""),
    md("""
`quantized` is made of codebook rows, but it was produced by indexing with an argmin, which has
no gradient: the encoder would learn nothing through it. The *straight-through* trick keeps the
values of `quantized` and the gradient of `vectors`: `(q - x).detach() + x` equals `q` in the
forward pass, while backward sees only `+ x`, so the decoder's gradient is handed to the
encoder unchanged.
"""),
    code("""
vq = (quantized - vectors).detach() + vectors
assert torch.allclose(vq, quantized)
upstream = torch.randn_like(vq)
vq.backward(upstream)
assert torch.equal(vectors.grad, upstream)  # identity gradient to the encoder
print(vq.detach())
"""),
    md("""
The project's quantizer finds the same codes on the same numbers (its codebook can be written
in place, and in `eval()` mode a call changes no state):
"""),
    code("""
from vqvae import VectorQuantize

ours = VectorQuantize(dim=6, codebook_size=4).eval()
with torch.no_grad():
    ours.codebook.copy_(codebook)
    out = ours(vectors.detach())
print(out.indices)
assert torch.equal(out.indices, codes)
assert torch.equal(out.quantized, quantized.detach())
"""),
    md("""
## The layer, by hand

Two loss terms train what the straight-through trick cannot reach:

* the **codebook loss** `mse(sg(x), q)` moves the chosen entries toward the encoder's vectors
  (the encoder's side is detached, `sg`);
* the **commitment loss** `mse(x, sg(q))` pulls the encoder's vectors toward their entries, so
  they do not drift away from the table.

The codebook starts uniform in [0, 1), as in the course.
"""),
    code("""
from torch import nn
import torch.nn.functional as F


class HandWrittenVectorQuantize(nn.Module):
    def __init__(self, *, codebook_size, dim, commitment_weight=1.0):
        super().__init__()
        self.commitment_weight = commitment_weight
        self.codebook = nn.Parameter(torch.rand(codebook_size, dim))

    def forward(self, x):  # x: (..., dim)
        distances = torch.cdist(x, self.codebook)    # (..., codebook_size)
        codes = distances.argmin(dim=-1)             # (...)
        quantized = self.codebook[codes]             # (..., dim)
        codebook_loss = F.mse_loss(quantized, x.detach())
        commitment_loss = F.mse_loss(x, quantized.detach())
        vq = (quantized - x).detach() + x            # straight-through
        return vq, codes, codebook_loss + self.commitment_weight * commitment_loss

    def decode(self, codes):
        return self.codebook[codes]


layer = HandWrittenVectorQuantize(codebook_size=4, dim=6)
with torch.no_grad():
    layer.codebook.copy_(codebook)
q, c, loss = layer(vectors.detach())
assert torch.equal(c, codes)
# Both terms are the same mean squared distance to the chosen entries
expected = 2 * (quantized.detach() - vectors.detach()).pow(2).mean()
assert torch.allclose(loss, expected)
print(f"loss {loss.item():.5f}")
"""),
    *shared_cells(epochs_default=5),
    md("""
### Training with the hand-written layer
"""),
    code("""
torch.manual_seed(0)
hand_model = MLPVQVAE(HandWrittenVectorQuantize(codebook_size=CODEBOOK_SIZE, dim=CODE_DIM))
hand_curve = train(hand_model)
results = {"hand-written": evaluate(hand_model)}
results["hand-written"]
"""),
    code('show_model(hand_model, "hand-written layer")'),
    md("""
Look at *codes used*: with the course's settings this layer ends up choosing only a handful of
the 512 entries (8 in a full-budget run), and the reconstructions show it: every input comes
back close to one average digit. An entry that is never the nearest gets no gradient from
either loss, so it stays where `torch.rand` put it. The untrained encoder's outputs all lie
within about 0.2 of zero, while the entries are spread over [0, 1)^16: the few entries nearest
the origin win the first batches and then do all the work, and 16 positions × a few symbols
cannot say which digit it was.

### Training with `vqvae.VectorQuantize`

The same model with the project's layer. It keeps the codebook as an exponential moving average
of the vectors assigned to each entry, starts the entries from N(0, 1), and after a warm-up moves
entries nobody chooses onto vectors of the batch, so the whole table stays in use. The options
below are the ones the project's training CLI uses for this model (the README explains how they
were chosen).
"""),
    code("""
torch.manual_seed(0)
ours = VectorQuantize(dim=CODE_DIM, codebook_size=CODEBOOK_SIZE, decay=0.95,
                      commitment_weight=0.1, threshold_ema_dead_code=1.0,
                      dead_code_warmup_steps=1000)
our_model = MLPVQVAE(ours)
our_curve = train(our_model)
results["vqvae.VectorQuantize"] = evaluate(our_model)
results["vqvae.VectorQuantize"]
"""),
    code('show_model(our_model, "vqvae.VectorQuantize")'),
    code("""
print(f"{'layer':24} {'test MSE':>9} {'perplexity':>10} {'codes used':>10}")
for name, r in results.items():
    print(f"{name:24} {r['test MSE']:9.5f} {r['perplexity']:10.1f} {r['codes used']:10d}")

plt.figure(figsize=(6, 3))
plt.semilogy(hand_curve, label="hand-written")
plt.semilogy(our_curve, label="vqvae.VectorQuantize")
plt.xlabel("step")
plt.ylabel("training MSE per pixel")
plt.legend()
plt.show()
"""),
]

# ---------------------------------------------------------------------------- notebook 3

PRIOR_AND_RESIDUAL = [
    md("""
# Beyond the exercises: residual quantizers and a learned prior

Two questions the exercises leave open:

1. **More bits per image.** One code per position caps what the decoder can be told at
   16 × 9 = 144 bits. A *residual* quantizer quantizes the vector, then quantizes what is left
   over (the residual) with a second codebook, and so on: L layers give L codes per position.
2. **Generating digits.** Uniformly random codes decode to smears, because real images use
   codes in particular combinations. A *prior* is a model of those combinations: trained on the
   codes of the training set, it samples new code sequences that decode to digits.
"""),
    *shared_cells(epochs_default=3),
    md("""
## Residual quantization: what more depths buy

`vqvae.ResidualVQ` stacks `num_quantizers` of our layers; its indices have one more axis,
`(..., num_quantizers)`, with depth 0 the coarsest. The commitment weight is divided by the
depth (the project's default for residual stacks), so deeper stacks do not pull the encoder
harder. Everything else (model, data, steps) is the same for every depth.
"""),
    code("""
from vqvae import ResidualVQ

DEPTHS = (1, 2, 4)
residual_models, residual_results = {}, {}
for depth in DEPTHS:
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=CODE_DIM, codebook_size=CODEBOOK_SIZE, num_quantizers=depth,
                     decay=0.95, commitment_weight=0.04 / depth,
                     threshold_ema_dead_code=1.0, dead_code_warmup_steps=1000)
    print(f"{depth} layer(s):")
    residual_models[depth] = MLPVQVAE(rvq)
    train(residual_models[depth])
    residual_results[depth] = evaluate(residual_models[depth])

bits = {d: NUM_CODES * d * 9 for d in DEPTHS}  # 9 bits per code of 512
print(f"{'layers':>6} {'bits / image':>12} {'test MSE':>9}")
for d in DEPTHS:
    print(f"{d:6d} {bits[d]:12d} {residual_results[d]['test MSE']:9.5f}")
plt.figure(figsize=(4, 3))
plt.plot([bits[d] for d in DEPTHS], [residual_results[d]["test MSE"] for d in DEPTHS], "o-")
plt.xlabel("bits per image")
plt.ylabel("test MSE per pixel")
plt.show()
"""),
    md("""
Each extra layer adds 144 bits; the error falls, but by less each time: the first layer already
captures the shape of the digit, later layers refine strokes. With the MLP the returns shrink
quickly, because past a point the encoder and decoder, not the codes, limit what comes back.

The deepest model can also be decoded from only its first layers: `partial_reconstructions`
adds the code vectors of depths `0..l` for each `l`, and the decoder turns each partial sum into
an image.
"""),
    code("""
deepest = max(DEPTHS)
model = residual_models[deepest].eval()
with torch.no_grad():
    _, indices, _ = model(test_images[:10])                   # (10, 16, depth)
    partial = model.vq.partial_reconstructions(indices)       # (10, 16, depth, 16)
    rows = [test_images[:10]] + [model.decode_vectors(partial[:, :, l]) for l in range(deepest)]
show_rows(rows, ["input"] + [f"{l + 1} layer(s)" for l in range(deepest)],
          f"decoding the first layers of a {deepest}-layer residual quantizer")
"""),
    md("""
## A learned prior over codes

The command line does the whole pipeline; here it runs from Python with `subprocess`, the same
commands one would type in a terminal:

* `vqvae train --out-dir RUN` trains the course's MLP VQ-VAE with our quantizer,
* `vqvae prior RUN` encodes the training set to codes and trains a small causal Transformer
  over the 16-code sequences (conditioned on the digit's label, with a null label so it can
  also sample without one),
* `vqvae sample RUN --prior` decodes codes drawn from the prior (`--digit 3` asks for a
  particular digit; without `--prior` it decodes uniformly random codes).

The run directory lands under `runs/` next to this notebook.
"""),
    code("""
import subprocess
import sys
from pathlib import Path

RUN = Path("runs") / "notebook-prior"


def vqvae_cli(*args):
    command = [sys.executable, "-m", "vqvae", *map(str, args)]
    print("$ vqvae", " ".join(map(str, args)))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout.strip()[-1500:])
    if done.returncode != 0:
        raise RuntimeError(f"vqvae {args[0]} failed:\\n{done.stderr[-3000:]}")
    print(f"({time.perf_counter() - start:.0f} s)\\n")


if FAST:
    train_args = ["--epochs", 1, "--train-subset", TRAIN_IMAGES, "--test-subset", TEST_IMAGES]
    prior_args = ["--epochs", 1, "--train-subset", 1_000, "--depth", 1, "--dim", 32]
else:
    train_args = ["--epochs", 10]  # about a minute; 10 is the CLI's default
    prior_args = []                # 2 layers, 128 wide, 4 epochs: a few minutes on one core
vqvae_cli("train", "--out-dir", RUN, "--no-progress", *train_args)
# Besides the prior, this writes samples_random.png and samples_by_digit.png into RUN
vqvae_cli("prior", RUN, "--no-progress", *prior_args)
vqvae_cli("sample", RUN, "--prior", "--num", 32, "--out", RUN / "notebook_prior.png")
"""),
    code("""
fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
for ax, (name, title) in zip(axes, [("samples_random.png", "uniformly random codes"),
                                    ("notebook_prior.png", "codes from the prior"),
                                    ("samples_by_digit.png", "the prior, asked for each digit")]):
    ax.imshow(plt.imread(RUN / name))
    ax.set_title(title)
    ax.axis("off")
plt.show()
"""),
    md("""
The prior's samples are drawn with classifier-free guidance (the CLI's default, 2): the model
is run with and without the label and pushed further toward the labelled prediction, which
trades some variety for cleaner digits. In the fast test budget (one short epoch of each) the
samples are still rough; the default budget gives recognisable digits. `vqvae judge RUN` scores
sample sets with a digit classifier, and `runs/notebook-prior/prior_metrics.json` holds the
prior's held-out likelihood.
"""),
]

NOTEBOOKS = {
    "01_exercise1_library_quantizer.ipynb": EXERCISE_1,
    "02_exercise2_own_quantizer.ipynb": EXERCISE_2,
    "03_residual_and_prior.ipynb": PRIOR_AND_RESIDUAL,
}


def build(cells) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=cells)
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    # Stable cell ids, so regenerating an unchanged notebook leaves the file unchanged
    for number, cell in enumerate(notebook.cells):
        cell.id = f"cell-{number:02d}"
    nbformat.validate(notebook)
    return notebook


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a notebook on disk differs from what would be written")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        text = nbformat.writes(build(cells)) + "\n"
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python {Path(__file__).name}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
