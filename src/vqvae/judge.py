"""The judge: a small MNIST classifier that scores sets of generated images.

    judge = load_or_train_judge("mnist")          # trained once, cached with its SHA-256
    report = judge.score(images)                  # images (N, 28, 28) or (N, 1, 28, 28) in [0, 1]

What a set of images is scored on (see :class:`JudgeReport`):

- ``inception_score``: ``exp(E_x KL(p(y|x) || p(y)))`` with the classifier in place of
  Inception, over the whole set (no splits). 1 when every image gets the same class
  distribution, 10 at most (ten classes): high when each image is confidently one class and
  the classes are used evenly.
- ``mean_confidence`` and ``confident_fraction``: the mean max-softmax probability and the
  fraction of images whose max-softmax exceeds 0.9.
- ``fd``: the Fréchet distance between Gaussians fitted to the classifier's penultimate
  features of the set and of the real test set (FID's formula, our classifier's features),
  computed in float64 with the matrix square root taken by symmetric eigendecompositions.
- ``class_histogram``: how many images are predicted as each class.

The classifier (:class:`JudgeNet`, two convolutions and two linear layers) is trained by
:func:`train_judge` and cached in ``$XDG_CACHE_HOME/vqvae/judge/`` (or a path given): the
weights file next to a JSON record with the SHA-256 of the weights, the test accuracy and the
settings. A weights file whose checksum does not match its record is never used.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DATASETS, load_dataset
from .rundir import atomic_torch_save, atomic_write_json, sha256_file, user_cache_dir

#: Bumped whenever the architecture or its training changes, so old caches are not mistaken
#: for the current judge.
JUDGE_VERSION = 1
#: Test accuracy a judge must reach before it is cached: a floor that catches a broken
#: training run. Fashion-MNIST is a harder task: this classifier reached 98.99% on MNIST and
#: 88.65% on Fashion-MNIST with the default settings.
MIN_ACCURACY = {"mnist": 0.985, "fashion-mnist": 0.88}
CONFIDENT = 0.9  # the max-softmax threshold of ``confident_fraction``


class JudgeError(RuntimeError):
    """The judge cannot be loaded or trained as asked."""


# ---------------------------------------------------------------------------- the classifier


class JudgeNet(nn.Module):
    """28×28 grayscale → 10 logits; ``features`` is the 128-wide penultimate layer."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, w, 14, 14)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7×7
            nn.Flatten(),
            nn.Linear(2 * width * 49, feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(images)))


def _as_batch(images: Tensor | np.ndarray) -> Tensor:
    """``(N, 1, 28, 28)`` float32 from ``(N, 28, 28)`` or ``(N, 1, 28, 28)`` in [0, 1]."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    x = x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError("images contain NaN or Inf")
    return x


# ---------------------------------------------------------------------------- metrics


def inception_score(probs: np.ndarray) -> float:
    """``exp(mean_x KL(p(y|x) || p(y)))`` of class probabilities ``(N, C)`` (rows sum to 1)."""
    p = np.asarray(probs, dtype=np.float64)
    marginal = p.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(marginal)), 0.0)
    return float(np.exp(terms.sum(axis=1).mean()))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||² + tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½)``, in float64.

    ``tr((S1 S2)^½)`` equals ``tr((S1^½ S2 S1^½)^½)``, and the latter is the square root of a
    symmetric PSD matrix: its eigenvalues are real and, after clipping round-off, non-negative,
    so no complex parts or ``sqrtm`` failures on near-singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.shape[0] < 2:
        raise ValueError("need at least two feature vectors to fit a covariance")
    return f.mean(axis=0), np.cov(f, rowvar=False)


@dataclass
class JudgeReport:
    """The judge's verdict on one set of images."""

    count: int
    inception_score: float
    mean_confidence: float
    confident_fraction: float
    fd: float | None  # against the reference set (None when there is none)
    class_histogram: list[int]
    accuracy: float | None = None  # when the set has labels (requested or true classes)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- the judge


@dataclass
class Judge:
    """A trained classifier, the statistics of its reference set and what it was trained on."""

    net: JudgeNet
    dataset: str
    info: dict = field(default_factory=dict)
    reference: tuple[np.ndarray, np.ndarray] | None = None  # (mu, sigma) of real test features
    batch_size: int = 1000

    @torch.no_grad()
    def predict(self, images: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities ``(N, 10)`` and penultimate features ``(N, 128)``, float64."""
        x = _as_batch(images)
        self.net.eval()
        device = next(self.net.parameters()).device
        probs, feats = [], []
        for start in range(0, x.shape[0], self.batch_size):
            batch = x[start:start + self.batch_size].to(device)
            features = self.net.features(batch)
            probs.append(torch.softmax(self.net.head(features).double(), -1).cpu())
            feats.append(features.double().cpu())
        if not probs:
            raise ValueError("no images to judge")
        return torch.cat(probs).numpy(), torch.cat(feats).numpy()

    def set_reference(self, images: Tensor | np.ndarray) -> None:
        self.reference = gaussian_stats(self.predict(images)[1])

    def score(self, images: Tensor | np.ndarray, labels=None) -> JudgeReport:
        """Score a set of images; ``labels`` (true or requested classes) add ``accuracy``."""
        probs, features = self.predict(images)
        confidence = probs.max(axis=1)
        predicted = probs.argmax(axis=1)
        fd = None
        if self.reference is not None:
            fd = frechet_distance(*gaussian_stats(features), *self.reference)
        accuracy = None
        if labels is not None:
            labels = np.asarray(torch.as_tensor(labels).cpu())
            accuracy = float((predicted == labels).mean())
        return JudgeReport(
            count=len(probs),
            inception_score=inception_score(probs),
            mean_confidence=float(confidence.mean()),
            confident_fraction=float((confidence > CONFIDENT).mean()),
            fd=fd,
            class_histogram=np.bincount(predicted, minlength=probs.shape[1]).tolist(),
            accuracy=accuracy,
        )


# ---------------------------------------------------------------------------- training


@dataclass
class JudgeTrainConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    train_subset: int | None = None  # tests use a few hundred images
    max_shift: int = 2  # random translation by up to this many pixels (augmentation)
    width: int = 32  # channels of the first convolution (tests use fewer)


def _shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by a random integer offset, zero-filled (makes the judge robust to
    slightly off-centre samples instead of calling them unreadable)."""
    if max_shift == 0:
        return images
    padded = F.pad(images[:, 0], (max_shift,) * 4)  # (N, S + 2m, S + 2m)
    n, size, width = images.shape[0], images.shape[-1], padded.shape[-1]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    window = torch.arange(size)
    rows = (dy + window).unsqueeze(-1).expand(n, size, width)  # (N, S, S + 2m)
    cols = (dx + window).unsqueeze(1).expand(n, size, size)  # (N, S, S)
    return padded.gather(1, rows).gather(2, cols).unsqueeze(1)


def train_judge(train_images: Tensor, train_labels: Tensor, test_images: Tensor,
                test_labels: Tensor, config: JudgeTrainConfig | None = None,
                progress: bool = False) -> tuple[JudgeNet, dict]:
    """Train a :class:`JudgeNet`; returns it (eval mode) and a record with its test accuracy."""
    config = config or JudgeTrainConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    x, y = _as_batch(train_images), torch.as_tensor(train_labels).long()
    if config.train_subset:
        x, y = x[:config.train_subset], y[:config.train_subset]
    net = JudgeNet(width=config.width)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    steps = config.epochs * -(-len(x) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), config.batch_size):
            index = order[i:i + config.batch_size]
            loss = F.cross_entropy(net(_shift(x[index], config.max_shift, generator)), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress:
            print(f"judge epoch {epoch + 1}/{config.epochs}: last batch loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(b).argmax(-1) for b in _as_batch(test_images).split(1000)])
    accuracy = float((predicted == torch.as_tensor(test_labels)).float().mean())
    record = {"version": JUDGE_VERSION, "test_accuracy": accuracy, "train_images": len(x),
              "seconds": round(time.perf_counter() - start, 1), "config": asdict(config)}
    return net, record


# ---------------------------------------------------------------------------- cache


def default_judge_path(dataset: str) -> Path:
    """Where the judge of ``dataset`` is cached: ``<cache>/vqvae/judge/<dataset>-v<N>.pt``."""
    return user_cache_dir("judge") / f"{dataset}-v{JUDGE_VERSION}.pt"


def _record_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_judge(net: JudgeNet, record: dict, path: Path) -> None:
    """Weights, then the record carrying their SHA-256 (both written atomically)."""
    path = Path(path)
    atomic_torch_save(path, net.state_dict())
    atomic_write_json(_record_path(path), {**record, "sha256": sha256_file(path)})


def load_judge_net(path: Path) -> tuple[JudgeNet, dict]:
    """A cached judge, verified against its record; raises :class:`JudgeError` otherwise."""
    path = Path(path)
    record_path = _record_path(path)
    if not path.is_file() or not record_path.is_file():
        raise JudgeError(f"no judge cached at {path}")
    record = json.loads(record_path.read_text())
    digest = sha256_file(path)
    if digest != record.get("sha256"):
        raise JudgeError(
            f"{path} failed verification: its SHA-256 is {digest}, its record {record_path} "
            f"says {record.get('sha256')}. Delete both files (or pass --retrain-judge) to train "
            "the judge again.")
    if record.get("version") != JUDGE_VERSION:
        raise JudgeError(f"{path} is a version {record.get('version')} judge, this code needs "
                         f"version {JUDGE_VERSION}; delete it or pass --retrain-judge")
    net = JudgeNet(width=record.get("config", {}).get("width", 32))
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval(), record


def load_or_train_judge(dataset: str = "mnist", path: str | os.PathLike | None = None,
                        data_dir=None, retrain: bool = False, progress: bool = True,
                        config: JudgeTrainConfig | None = None) -> Judge:
    """The judge of ``dataset``, from the cache or trained now (and then cached).

    The returned judge has its reference statistics set from the real test set.
    """
    if dataset not in DATASETS:
        raise JudgeError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    path = Path(path) if path is not None else default_judge_path(dataset)
    test = load_dataset(dataset, "test", data_dir, progress=progress)
    if retrain or not path.is_file():
        train = load_dataset(dataset, "train", data_dir, progress=progress)
        if progress:
            print(f"training the {dataset} judge (once; cached in {path})")
        net, record = train_judge(train.as_float(), train.labels, test.as_float(), test.labels,
                                  config, progress=progress)
        record["dataset"] = dataset
        needed = MIN_ACCURACY.get(dataset, 0.0)
        if record["test_accuracy"] < needed and not (config and config.train_subset):
            raise JudgeError(f"the judge reached {record['test_accuracy']:.2%} test accuracy, "
                             f"below the {needed:.1%} a {dataset} judge needs; not cached")
        save_judge(net, record, path)
    else:
        net, record = load_judge_net(path)
        if record.get("dataset") != dataset:
            raise JudgeError(f"{path} is a judge for {record.get('dataset')!r}, not {dataset!r}")
    judge = Judge(net, dataset, {**record, "path": str(path)})
    judge.set_reference(test.as_float())
    return judge


# ---------------------------------------------------------------------------- tables


def report_table(rows: dict[str, JudgeReport], classes: int = 10) -> str:
    """A Markdown table: one row per named set."""
    header = ("| set | images | IS | FD | mean conf. | conf. > 0.9 | accuracy | "
              "predicted classes (0-9) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        fd = "-" if r.fd is None else f"{r.fd:.1f}"
        accuracy = "-" if r.accuracy is None else f"{r.accuracy:.1%}"
        histogram = " ".join(str(c) for c in r.class_histogram[:classes])
        lines.append(f"| {name} | {r.count} | {r.inception_score:.2f} | {fd} | "
                     f"{r.mean_confidence:.3f} | {r.confident_fraction:.1%} | {accuracy} | "
                     f"{histogram} |")
    return "\n".join(lines)
