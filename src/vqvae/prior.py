"""A learned prior over a VQ-VAE's codes: a small causal Transformer, and how it is trained.

A VQ-VAE generates well only when its codes are drawn from the distribution the encoder
produces; uniformly random codes decode to smears. This module models that distribution
autoregressively::

    prior = CodePrior(PriorConfig(vocab_size=512, code_shape=(7, 7)))
    codes = sample(prior, 64, labels=torch.full((64,), 7))   # (64, 7, 7) int64

Codes of any layout become one token sequence by a row-major flatten of everything after the
batch axis: ``(B, positions)``, a grid ``(B, H, W)`` (raster order), residual depths
``(B, positions, depth)`` (coarse to fine within a position) or groups
``(B, positions, groups, depth)``. The model sees only the flat sequence and a learned
embedding per flat index, so no layout needs code of its own; :func:`flatten_codes` and
:func:`unflatten_codes` are the two ends.

The sequence starts with a class token: the label's embedding, or the *null* label's when
there is no condition. Labels are replaced by the null label for a fraction of training
sequences (``label_dropout``), so one model samples unconditionally, conditionally, and with
classifier-free guidance (``logits_null + scale · (logits_label - logits_null)``).

Sampling draws one uniform number per sequence per step from the generator and inverts the
cumulative distribution: a cached and an uncached run with the same seed make the same draws,
which is what lets the tests check that the KV cache changes nothing.

:class:`FrequencyPrior` is the baseline: each position drawn independently from its empirical
code frequencies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pretrained import PretrainedMixin
from .rundir import atomic_torch_save, resolve_device, uses_bf16
from .schedule import warmup_cosine

# ---------------------------------------------------------------------------- layouts


def flatten_codes(codes: Tensor, code_shape: tuple[int, ...]) -> Tensor:
    """``(B, *code_shape)`` → ``(B, prod(code_shape))``, row-major."""
    if tuple(codes.shape[1:]) != tuple(code_shape):
        raise ValueError(f"codes must have shape (B, {', '.join(map(str, code_shape))}), "
                         f"got {tuple(codes.shape)}")
    return codes.reshape(codes.shape[0], -1)


def unflatten_codes(tokens: Tensor, code_shape: tuple[int, ...]) -> Tensor:
    """``(B, prod(code_shape))`` → ``(B, *code_shape)``: the inverse of :func:`flatten_codes`."""
    return tokens.reshape(tokens.shape[0], *code_shape)


# ---------------------------------------------------------------------------- the model


@dataclass
class PriorConfig:
    """Everything needed to rebuild a prior; saved with its checkpoint."""

    vocab_size: int  # codes in the VQ-VAE's codebook
    code_shape: tuple[int, ...]  # codes per image, e.g. (16,) or (7, 7)
    # Labels it can be conditioned on (the dataset's num_classes; 0: unconditional); one more,
    # the null label, is added
    num_classes: int = 0
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    # No dropout: with 60,000 sequences and a few epochs the prior underfits (train NLL stays
    # above held-out), and dropout costs time on every step (README, "Development").
    dropout: float = 0.0
    label_dropout: float = 0.1  # training sequences whose label is replaced by the null label

    def __post_init__(self) -> None:
        self.code_shape = tuple(int(s) for s in self.code_shape)
        if self.vocab_size < 1 or not self.code_shape or min(self.code_shape) < 1:
            raise ValueError("vocab_size and every code_shape entry must be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError("label_dropout must lie in [0, 1]")

    @property
    def seq_len(self) -> int:
        return math.prod(self.code_shape)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["code_shape"] = list(self.code_shape)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PriorConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown prior config keys: {sorted(unknown)}")
        return cls(**values)


class KVCache:
    """Keys and values of every layer for the positions seen so far: ``(B, heads, T, head_dim)``
    each, allocated once for the whole sequence."""

    def __init__(self, config: PriorConfig, batch: int, device, dtype=torch.float32):
        shape = (batch, config.heads, config.seq_len, config.dim // config.heads)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.depth)]
        self.values = [torch.empty(shape, device=device, dtype=dtype)
                       for _ in range(config.depth)]
        self.length = 0  # positions filled


class SelfAttention(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.dropout = config.dropout

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:  # the whole sequence at once, causally masked
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:  # one new position attends to everything cached so far and to itself
            if t != 1:
                raise ValueError("the KV cache takes one position at a time")
            end = cache.length + 1
            cache.keys[layer][:, :, cache.length] = k[:, :, 0]
            cache.values[layer][:, :, cache.length] = v[:, :, 0]
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
            # one query: plain matmuls beat the fused kernel here on CPU (README, "Development")
            scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5  # (B, H, 1, T)
            out = torch.softmax(scores, -1) @ v
        out = out.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return F.dropout(self.proj(out), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attention = SelfAttention(config)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.mlp_ratio * config.dim), nn.GELU(),
            nn.Linear(config.mlp_ratio * config.dim, config.dim), nn.Dropout(config.dropout))

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attention(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class CodePrior(PretrainedMixin, nn.Module):
    """Causal Transformer over flat code sequences, conditioned on a class token.

    Input position 0 holds the class token (label or null); position ``i > 0`` holds code
    ``i - 1``. The output at position ``i`` is the distribution of code ``i``.

    ``save_pretrained(dir)`` / ``from_pretrained(dir)`` write and read ``prior.safetensors`` and
    ``prior_config.json``: names of their own, so the prior sits beside its VQ-VAE's
    ``model.safetensors`` and ``config.json`` in a run directory.
    """

    weights_name = "prior.safetensors"
    config_name = "prior_config.json"

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.dim)
        self.position_embedding = nn.Parameter(torch.zeros(config.seq_len, config.dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size)
        # how often each label occurs in the training set: a sampler that draws the class
        # first, p(y) then p(codes | y), needs it; set by train_prior, saved with the weights
        self.register_buffer("label_counts", torch.zeros(max(config.num_classes, 1)))
        self.apply(self._init)
        nn.init.normal_(self.position_embedding, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def _labels(self, labels: Tensor | None, batch: int, device) -> Tensor:
        if labels is None:
            return torch.full((batch,), self.config.null_label, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long().reshape(-1)
        if labels.numel() and (int(labels.min()) < 0
                               or int(labels.max()) > self.config.null_label):
            raise ValueError(f"labels must lie in [0, {self.config.num_classes}] "
                             f"({self.config.num_classes} is the null label)")
        return labels

    def forward(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits ``(B, L, vocab)`` of every code of ``tokens`` ``(B, L)`` given the codes
        before it (teacher forcing); ``labels`` ``(B,)`` or ``None`` for the null label."""
        b, length = tokens.shape
        if length > self.config.seq_len:
            raise ValueError(f"sequences are at most {self.config.seq_len} codes long")
        start = self.class_embedding(self._labels(labels, b, tokens.device))[:, None]  # (B,1,D)
        x = torch.cat([start, self.token_embedding(tokens[:, :-1])], 1)  # (B, L, D)
        x = x + self.position_embedding[:length]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def step(self, previous: Tensor | None, labels: Tensor, cache: KVCache) -> Tensor:
        """Logits ``(B, vocab)`` of the next code, given the code just drawn (``None`` at the
        start, when the class token goes in) and the cache of all earlier positions."""
        position = cache.length
        if position == 0:
            x = self.class_embedding(labels)
        else:
            x = self.token_embedding(previous)
        x = (x + self.position_embedding[position])[:, None]  # (B, 1, D)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        cache.length += 1
        return self.head(self.norm(x[:, 0]))

    def nll(self, tokens: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mean negative log-likelihood per code, in nats."""
        logits = self(tokens, labels)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


# ---------------------------------------------------------------------------- sampling


def _filter_logits(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return logits


def _draw(logits: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF draw: the first code whose cumulative probability exceeds ``uniform``."""
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    index = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1]).unsqueeze(-1))
    return index.squeeze(-1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def sample_tokens(prior: CodePrior, labels: Tensor, generator: torch.Generator | None = None,
                  temperature: float = 1.0, top_k: int | None = None,
                  guidance_scale: float = 1.0, use_cache: bool = True) -> Tensor:
    """One batch of flat code sequences ``(B, L)`` for ``labels`` ``(B,)`` (null for none).

    ``guidance_scale`` 1 samples from the conditional model; above 1 it applies
    classifier-free guidance against the null label (rows whose label is null are unaffected).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    prior.eval()
    config = prior.config
    device = prior.head.weight.device
    labels = prior._labels(labels, 0, device)
    batch = labels.shape[0]
    guided = guidance_scale != 1.0
    if guided:  # conditional and null rows run as one batch
        labels = torch.cat([labels, torch.full_like(labels, config.null_label)])
    tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    cache = KVCache(config, labels.shape[0], device) if use_cache else None
    for _ in range(config.seq_len):
        if use_cache:
            previous = None if tokens.shape[1] == 0 else tokens[:, -1]
            if guided and previous is not None:
                previous = torch.cat([previous, previous])
            logits = prior.step(previous, labels, cache)
        else:
            both = torch.cat([tokens, tokens]) if guided else tokens
            padded = F.pad(both, (0, 1))  # the last input is a placeholder that is never read
            logits = prior(padded, labels)[:, -1]
        if guided:
            conditional, null = logits.float().chunk(2)
            logits = null + guidance_scale * (conditional - null)
        uniform = torch.rand(batch, generator=generator).to(device)  # a CPU generator
        tokens = torch.cat([tokens, _draw(_filter_logits(logits, temperature, top_k),
                                          uniform)[:, None]], 1)
    return tokens


def draw_labels(prior: CodePrior, count: int, seed: int = 0) -> Tensor:
    """``count`` labels drawn from the training set's label frequencies."""
    if not prior.config.num_classes or prior.label_counts.sum() == 0:
        raise ValueError("this prior was trained without labels")
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(prior.label_counts.cpu().double(), count, replacement=True,
                             generator=generator)


@torch.no_grad()
def sample(prior: CodePrior, count: int, labels: Tensor | None = None, seed: int = 0,
           temperature: float = 1.0, top_k: int | None = None, guidance_scale: float = 1.0,
           batch_size: int = 2000, use_cache: bool = True) -> Tensor:
    """``count`` code arrays ``(count, *code_shape)``; ``labels`` ``(count,)`` or ``None``."""
    config = prior.config
    if labels is None:
        labels = torch.full((count,), config.null_label, dtype=torch.long)
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != count:
        raise ValueError(f"labels must have {count} entries, got {labels.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    chunks = [sample_tokens(prior, labels[start:start + batch_size], generator, temperature,
                            top_k, guidance_scale, use_cache)
              for start in range(0, count, batch_size)]
    return unflatten_codes(torch.cat(chunks).cpu(), config.code_shape)


# ---------------------------------------------------------------------------- baseline


class FrequencyPrior:
    """Each position drawn independently from its code frequencies (add-``alpha`` smoothed)."""

    def __init__(self, tokens: Tensor, vocab_size: int, code_shape: tuple[int, ...],
                 alpha: float = 0.5):
        tokens = tokens.reshape(tokens.shape[0], -1).long().cpu()
        counts = torch.zeros(tokens.shape[1], vocab_size, dtype=torch.float64)
        counts.scatter_add_(1, tokens.T, torch.ones(tokens.T.shape, dtype=torch.float64))
        self.probs = (counts + alpha) / (counts + alpha).sum(1, keepdim=True)  # (L, V)
        self.code_shape = tuple(code_shape)

    def nll(self, tokens: Tensor) -> float:
        """Mean negative log-likelihood per code, in nats."""
        tokens = tokens.reshape(tokens.shape[0], -1).long().cpu()
        log_probs = self.probs.log().gather(1, tokens.T)  # (L, B)
        return float(-log_probs.mean())

    def sample(self, count: int, seed: int = 0) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.multinomial(self.probs, count, replacement=True, generator=generator)
        return unflatten_codes(tokens.T.contiguous(), self.code_shape)


# ---------------------------------------------------------------------------- training


@dataclass
class PriorTrainConfig:
    epochs: int = 4
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    seed: int = 0
    # "bf16" runs the forward pass under autocast; "auto" picks it where the CPU has native
    # bf16 dot products (or on CUDA), where it is much faster (README, "Development").
    # Evaluation and sampling stay float32.
    precision: str = "auto"
    device: str = "cpu"
    train_subset: int | None = None  # first N training sequences (quick runs and tests)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class PriorRun:
    prior: CodePrior
    metrics: dict[str, Any]
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate_nll(prior: CodePrior, tokens: Tensor, labels: Tensor | None = None,
                 batch_size: int = 2000) -> float:
    """Mean NLL per code (nats) of flat ``tokens``, with ``labels`` or unconditionally."""
    prior.eval()
    total = 0.0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        batch_labels = None if labels is None else labels[start:start + batch_size]
        total += float(prior.nll(batch, batch_labels)) * batch.shape[0]
    return total / tokens.shape[0]


def train_prior(train_tokens: Tensor, train_labels: Tensor | None, config: PriorConfig,
                train_config: PriorTrainConfig | None = None, *,
                val_tokens: Tensor | None = None, val_labels: Tensor | None = None,
                checkpoint: Path | None = None, on_epoch_end=None) -> PriorRun:
    """Train a :class:`CodePrior` on flat ``train_tokens`` ``(N, L)``.

    ``on_epoch_end(epoch, entry)`` is called after each epoch (and its checkpoint) with that
    epoch's history entry.

    With ``checkpoint``, the prior (its config, weights and history) is saved there atomically
    after every epoch. ``val_tokens`` add the held-out NLL after the last epoch (after every
    epoch it cost a fifth of the training time), next to the frequency baseline's.
    """
    from tqdm import tqdm

    train_config = train_config or PriorTrainConfig()
    device = resolve_device(train_config.device)
    bf16 = uses_bf16(train_config.precision, device)
    torch.manual_seed(train_config.seed)
    generator = torch.Generator().manual_seed(train_config.seed)
    conditional = train_labels is not None and config.num_classes > 0
    if train_config.train_subset:
        train_tokens = train_tokens[:train_config.train_subset]
        train_labels = None if train_labels is None else train_labels[:train_config.train_subset]
    prior = CodePrior(config).to(device)
    if conditional:
        prior.label_counts.copy_(torch.bincount(train_labels.cpu().long(),
                                                minlength=config.num_classes).float())
    train_tokens = train_tokens.to(device)
    if conditional:
        train_labels = train_labels.to(device)
    if val_tokens is not None:
        val_tokens = val_tokens.to(device)
        val_labels = None if val_labels is None else val_labels.to(device)
    decay, no_decay = [], []
    for name, parameter in prior.named_parameters():
        (decay if parameter.ndim >= 2 and "embedding" not in name else no_decay).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train_config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train_config.lr, betas=(0.9, 0.98),
                                  fused=device.type in ("cpu", "cuda"))
    n = train_tokens.shape[0]
    per_epoch = -(-n // train_config.batch_size)
    total = per_epoch * train_config.epochs
    baseline = FrequencyPrior(train_tokens, config.vocab_size, config.code_shape)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    history: list[dict] = []
    start_time, start_cpu = time.perf_counter(), time.process_time()
    step = 0
    for epoch in range(train_config.epochs):
        prior.train()
        order = torch.randperm(n, generator=generator)
        running = 0.0
        bar = tqdm(range(per_epoch), desc=f"prior epoch {epoch + 1}/{train_config.epochs}",
                   leave=False, disable=not train_config.progress, dynamic_ncols=True)
        epoch_start = time.perf_counter()
        for i in bar:
            index = order[i * train_config.batch_size:(i + 1) * train_config.batch_size]
            index = index.to(device)
            factor = warmup_cosine(step, total, train_config.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = train_config.lr * factor
            labels = None
            if conditional:
                labels = train_labels[index].clone()
                dropped = torch.rand(len(index), generator=generator) < config.label_dropout
                labels[dropped.to(device)] = config.null_label
            with autocast:
                loss = prior.nll(train_tokens[index], labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            optimizer.step()
            step += 1
            running += loss.item()
            if i % 20 == 0:
                bar.set_postfix(nll=f"{running / (i + 1):.3f}", refresh=False)
        bar.close()
        entry = {"epoch": epoch + 1, "train_nll": running / per_epoch,
                 "seconds": time.perf_counter() - epoch_start}
        # held-out NLL (float32, two passes over it) after the last epoch only: after every
        # epoch it cost a fifth of the training time
        if val_tokens is not None and epoch + 1 == train_config.epochs:
            entry["val_nll"] = evaluate_nll(prior, val_tokens)
            if conditional and val_labels is not None:
                entry["val_nll_conditional"] = evaluate_nll(prior, val_tokens, val_labels)
        history.append(entry)
        if train_config.progress:
            print("prior epoch " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else
                                             f"{k} {v}" for k, v in entry.items()))
        if checkpoint is not None:
            atomic_torch_save(Path(checkpoint), {
                "prior": prior.state_dict(), "prior_config": config.to_dict(),
                "train_config": json.dumps(dataclasses.asdict(train_config)),
                "history": json.dumps(history)})
        if on_epoch_end is not None:
            on_epoch_end(epoch, entry)
    metrics: dict[str, Any] = {
        "train_seconds": time.perf_counter() - start_time,
        # CPU time of this process while training: on a shared machine, wall time says more
        # about the neighbours than about the prior
        "train_cpu_seconds": time.process_time() - start_cpu,
        "epochs": train_config.epochs,
        "parameters": sum(p.numel() for p in prior.parameters()),
        "precision": "bf16" if bf16 else "fp32",
        "threads": torch.get_num_threads(),
        "prior_config": config.to_dict(),
        "history": history,
    }
    if val_tokens is not None:
        metrics["val_nll"] = history[-1]["val_nll"]
        metrics["val_nll_frequency_baseline"] = baseline.nll(val_tokens)
        if "val_nll_conditional" in history[-1]:
            metrics["val_nll_conditional"] = history[-1]["val_nll_conditional"]
    return PriorRun(prior.cpu().eval(), metrics, history)


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> CodePrior:
    """A prior saved by :func:`train_prior`, in eval mode (loaded with ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train a prior first with 'vqvae prior'")
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    prior = CodePrior(PriorConfig(**checkpoint["prior_config"]))
    prior.load_state_dict(checkpoint["prior"])
    return prior.to(device).eval()


# ---------------------------------------------------------------------------- images


@torch.no_grad()
def sample_images(model, prior: CodePrior, count: int, digit: int | None = None, seed: int = 0,
                  temperature: float = 1.0, top_k: int | None = None,
                  guidance_scale: float = 1.0, batch_size: int = 2000) -> Tensor:
    """``count`` images ``(N, 1, H, W)`` in [0, 1] decoded from prior samples.

    With ``digit``, all of that class. Without, and with ``guidance_scale`` 1, codes are drawn
    from the null label (the model's own p(codes)); with ``guidance_scale`` above 1, each
    sample's class is first drawn from the training label frequencies and its codes then
    sampled with guidance toward it: still no class asked for, but sharper digits.
    """
    labels = None
    if digit is None and guidance_scale != 1.0:
        if prior.config.num_classes:
            labels = draw_labels(prior, count, seed)
        else:  # a prior trained without labels: nothing to guide toward
            guidance_scale = 1.0
    if digit is not None:
        if not prior.config.num_classes:
            raise ValueError("this prior was trained without labels; it cannot sample a digit")
        if not 0 <= digit < prior.config.num_classes:
            raise ValueError(f"digit must lie in 0-{prior.config.num_classes - 1}, got {digit}")
        labels = torch.full((count,), digit, dtype=torch.long)
    codes = sample(prior, count, labels, seed=seed, temperature=temperature, top_k=top_k,
                   guidance_scale=guidance_scale, batch_size=batch_size)
    device = next(model.parameters()).device
    return torch.cat([model.decode(c.to(device)).cpu() for c in codes.split(batch_size)])
