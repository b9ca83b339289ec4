"""VQ-VAE models: encoder, quantizer and decoder, configured by one dataclass.

The MLP model is the course's, layer for layer:

    encoder  784 → 300 → 300 → vector_dim·num_embeddings   (LeakyReLU between)
    reshape  (B, num_embeddings, vector_dim): one code per position
    decoder  vector_dim·num_embeddings → 300 → 300 → 784    (LeakyReLU between, Sigmoid last)

The quantizer is chosen by name (see :data:`QUANTIZERS`); every one follows the contract
``quantized, indices, loss = q(x)`` with ``x`` of shape ``(..., vector_dim)`` and has
``decode(indices)``.

The convolutional model (``model="conv"``) is for quality: two stride-2 convolutions take an
image of ``channels_in`` channels, H×W pixels (H and W multiples of 4) to an H/4×W/4 grid of
``vector_dim`` vectors, one code per grid cell (a 28×28 MNIST digit: 7×7, 49 codes), and
transposed convolutions take them back.

Codes of one image have the shape :attr:`ModelConfig.code_shape`: the positions
(``(num_embeddings,)`` for the MLP, ``(7, 7)`` for the conv model's grid), then the codebook axes
of the quantizer: none for a single codebook, ``(num_quantizers,)`` for a residual quantizer and
``(groups, num_quantizers)`` for a grouped residual one. Everything that handles codes asks it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .quantizers import GroupedResidualVQ, ResidualVQ, VectorQuantize, VQOutput
from .quantizers.course import CourseVectorQuantize

#: Options of our VectorQuantize for the MNIST models (``--quantizer ours``), chosen by
#: measurement (README, "How the defaults were chosen"). Random N(0, 1) codes, not k-means:
#: k-means on the untrained encoder's outputs gives each of the 16 positions its own ~32
#: codes, 5 bits per position instead of 9. Restarts of dead codes wait for the encoder's
#: outputs to spread out, for the same reason. A slower EMA (0.95) and a light commitment
#: weight (0.1) let the encoder move more freely.
OURS_DEFAULTS: dict[str, Any] = {
    "decay": 0.95,
    "commitment_weight": 0.1,
    "kmeans_init": False,
    "threshold_ema_dead_code": 1.0,
    "dead_code_warmup_steps": 1000,
    # this project's choices where VectorQuantize's defaults follow the reference library
    "rotation_trick": False,
    "codebook_init": "normal",
}


def _ours(dim: int, codebook_size: int, options: dict) -> nn.Module:
    return VectorQuantize(dim=dim, codebook_size=codebook_size, **options)


def _lucidrains(dim: int, codebook_size: int, options: dict) -> nn.Module:
    from vector_quantize_pytorch import VectorQuantize as LibraryVectorQuantize

    layer = LibraryVectorQuantize(dim=dim, codebook_size=codebook_size, **options)
    layer.decode = layer.get_output_from_indices
    return layer


#: Commitment weight of the residual presets before division by the depth. Every layer's loss
#: pulls the encoder toward its own partial sum (the first toward the coarsest), so the pull of
#: the mean of L layers is dominated by coarse errors a deep stack no longer makes. Measured with
#: the MLP on MNIST, 4 layers: commitment 0.1 gives test MSE 0.0070, 0.025 gives 0.0065, 0.01
#: gives 0.0060, 0.0025 gives 0.0062; 8 layers: 0.0125 gives 0.0058, 0.005 gives 0.0055.
RESIDUAL_COMMITMENT = 0.04


def _depth_scaled(options: dict) -> dict:
    """``commitment_weight=None`` means ``RESIDUAL_COMMITMENT / num_quantizers``."""
    if options.get("commitment_weight") is not None:
        return options
    depth = options.get("num_quantizers", 1)
    return {**options, "commitment_weight": RESIDUAL_COMMITMENT / depth}


def _residual(dim: int, codebook_size: int, options: dict) -> nn.Module:
    return ResidualVQ(dim=dim, codebook_size=codebook_size, **_depth_scaled(options))


def _grouped(dim: int, codebook_size: int, options: dict) -> nn.Module:
    return GroupedResidualVQ(dim=dim, codebook_size=codebook_size, **_depth_scaled(options))


class LibraryResidual(nn.Module):
    """The library's ``ResidualVQ`` / ``GroupedResidualVQ`` behind our contract.

    The library returns one loss per depth (and group) and puts the group axis first; this
    returns a scalar loss reduced as ours is (the mean over depths and groups) and indices laid
    out as ours, ``(..., num_quantizers)`` or ``(..., groups, num_quantizers)``. (The library
    pads the depths quantize dropout skipped with zero losses; the comparisons use no dropout.)
    """

    def __init__(self, module: nn.Module, grouped: bool):
        super().__init__()
        self.module = module
        self.grouped = grouped

    def forward(self, x: Tensor) -> VQOutput:
        quantized, indices, losses = self.module(x)
        if self.grouped:
            indices = indices.movedim(0, -2)
        return VQOutput(quantized, indices, losses.mean())

    def decode(self, indices: Tensor) -> Tensor:
        if self.grouped:
            indices = indices.movedim(-2, 0)  # (groups, ..., num_quantizers)
        return self.module.get_output_from_indices(indices)


def _lucidrains_residual(dim: int, codebook_size: int, options: dict) -> nn.Module:
    from vector_quantize_pytorch import ResidualVQ as LibraryResidualVQ

    return LibraryResidual(LibraryResidualVQ(dim=dim, codebook_size=codebook_size,
                                             **_depth_scaled(options)), grouped=False)


def _lucidrains_grouped(dim: int, codebook_size: int, options: dict) -> nn.Module:
    from vector_quantize_pytorch import GroupedResidualVQ as LibraryGroupedResidualVQ

    return LibraryResidual(LibraryGroupedResidualVQ(dim=dim, codebook_size=codebook_size,
                                                    **_depth_scaled(options)), grouped=True)


def _naive(dim: int, codebook_size: int, options: dict) -> nn.Module:
    if options:
        raise ValueError(f"the course's layer takes no options, got {sorted(options)}")
    return CourseVectorQuantize(codebook_size=codebook_size, dim=dim)


#: The library's residual quantizers with the settings of ours (``OURS_DEFAULTS``) that it has,
#: so that a comparison is like with like: the same decay, commitment weight, initialisation and
#: dead-code threshold, and straight-through gradients (the library's default is the rotation
#: trick). It has no warm-up before dead-code restarts: its restarts start at the first step.
#: Ours for residual stacks: the commitment weight is divided by the depth (``_depth_scaled``).
RESIDUAL_DEFAULTS: dict[str, Any] = {**OURS_DEFAULTS, "commitment_weight": None}

LIBRARY_RESIDUAL_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in RESIDUAL_DEFAULTS.items()
       if k not in ("dead_code_warmup_steps", "codebook_init")},
    "rotation_trick": False,
}

#: name -> (builder, default options). Options given in a config replace the defaults key by key.
QUANTIZERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "ours": (_ours, OURS_DEFAULTS),
    # Exercise 1: the library's layer with the course's settings
    "lucidrains": (_lucidrains, {"decay": 0.8, "commitment_weight": 1.0}),
    # Exercise 2 as the course writes it
    "naive": (_naive, {}),
    # The residual family, ours and the library's
    "rvq": (_residual, RESIDUAL_DEFAULTS),
    # Temperature for this model's latent scale: on a trained 4-layer MLP model the nearest code
    # is ~0.06 away at depth 1 and the 10th ~0.18; at 0.1 (the library README's value) codes are
    # sampled among dozens, at 0.01 the second-nearest is ~e^-3 as likely as the nearest.
    "rqvae": (_residual, {**RESIDUAL_DEFAULTS, "shared_codebook": True,
                          "stochastic_sample_codes": True, "sample_codebook_temp": 0.01}),
    "grvq": (_grouped, RESIDUAL_DEFAULTS),
    "lucidrains-rvq": (_lucidrains_residual, LIBRARY_RESIDUAL_DEFAULTS),
    "lucidrains-grvq": (_lucidrains_grouped, LIBRARY_RESIDUAL_DEFAULTS),
}

#: The ModelConfig fields that shape a quantizer's codes, per quantizer: they are passed to its
#: builder as options and give the codes of a position their axes, in this order.
CODE_AXES: dict[str, tuple[str, ...]] = {
    "rvq": ("num_quantizers",),
    "rqvae": ("num_quantizers",),
    "grvq": ("groups", "num_quantizers"),
    "lucidrains-rvq": ("num_quantizers",),
    "lucidrains-grvq": ("groups", "num_quantizers"),
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved with every checkpoint."""

    model: str = "mlp"
    image_size: int = 28
    hidden_dim: int = 300
    vector_dim: int = 16
    num_embeddings: int = 16  # code positions per image
    codebook_size: int = 512
    quantizer: str = "ours"
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    num_quantizers: int = 1  # depths of a residual quantizer (see CODE_AXES)
    groups: int = 1  # feature groups of a grouped residual quantizer
    # Width of the conv model (its first layer has half); the MLP ignores it. 32 reaches test
    # MSE 0.003 on MNIST in 6 epochs and trains in about half the time of 64 on a CPU.
    channels: int = 32
    channels_in: int = 1  # channels of the images: 1 gray, 3 RGB (the conv model only)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(MODELS)}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(
                f"unknown quantizer {self.quantizer!r}; choose one of {sorted(QUANTIZERS)}")
        for name in ("image_size", "hidden_dim", "vector_dim", "num_embeddings", "codebook_size",
                     "num_quantizers", "groups", "channels", "channels_in"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.model != "conv" and self.channels_in != 1:
            raise ValueError(f"channels_in={self.channels_in} needs model='conv'")
        if self.model == "conv" and self.image_size % 4:
            raise ValueError(f"the conv model needs an image size divisible by 4, "
                             f"got {self.image_size}")
        axes = CODE_AXES.get(self.quantizer, ())
        for name in ("num_quantizers", "groups"):
            if getattr(self, name) != 1 and name not in axes:
                takers = sorted(q for q, a in CODE_AXES.items() if name in a)
                raise ValueError(f"quantizer {self.quantizer!r} does not take {name}="
                                 f"{getattr(self, name)}; choose one of {takers}")
            if name in self.quantizer_options:
                raise ValueError(f"{name} is a model setting (ModelConfig.{name}, "
                                 f"--{name.replace('_', '-')}), not a quantizer option")
        if self.vector_dim % self.groups:
            raise ValueError(f"vector_dim={self.vector_dim} must be a multiple of "
                             f"groups={self.groups}")
        # Record the options in full, so a checkpoint says exactly what was trained
        self.quantizer_options = {**QUANTIZERS[self.quantizer][1], **self.quantizer_options}

    @property
    def position_shape(self) -> tuple[int, ...]:
        """Code positions per image: ``(num_embeddings,)`` for the MLP, the conv model's grid
        ``(image_size // 4, image_size // 4)``."""
        if self.model == "conv":
            return (self.image_size // 4, self.image_size // 4)
        return (self.num_embeddings,)

    @property
    def codebook_axes(self) -> tuple[int, ...]:
        """The quantizer's codes per position: ``()``, ``(num_quantizers,)`` or
        ``(groups, num_quantizers)``."""
        return tuple(getattr(self, a) for a in CODE_AXES.get(self.quantizer, ()))

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one image's codes: ``position_shape + codebook_axes``."""
        return self.position_shape + self.codebook_axes

    @property
    def codebooks_per_position(self) -> int:
        """Codes per position: ``groups × num_quantizers`` (1 for a single codebook)."""
        return math.prod(self.codebook_axes)

    @property
    def bits_per_image(self) -> float:
        """Size of one image's codes in bits: ``prod(code_shape) · log2(codebook_size)``."""
        return math.prod(self.code_shape) * math.log2(self.codebook_size)

    def quantizer_arguments(self) -> dict[str, Any]:
        """The options the quantizer's builder gets: ``quantizer_options`` and the code axes."""
        axes = {a: getattr(self, a) for a in CODE_AXES.get(self.quantizer, ())}
        return {**self.quantizer_options, **axes}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**values)


class VQVAEOutput(NamedTuple):
    reconstruction: Tensor  # (B, 1, H, W) in [0, 1]
    indices: Tensor  # (B, *code_shape) int64 codes
    vq_loss: Tensor  # scalar


class MLPEncoder(nn.Sequential):
    def __init__(self, config: ModelConfig):
        pixels = config.image_size**2
        super().__init__(
            nn.Flatten(),
            nn.Linear(pixels, config.hidden_dim),
            nn.LeakyReLU(),
            nn.Linear(config.hidden_dim, config.hidden_dim),
            nn.LeakyReLU(),
            nn.Linear(config.hidden_dim, config.vector_dim * config.num_embeddings),
            nn.Unflatten(1, (config.num_embeddings, config.vector_dim)),
        )


class MLPDecoder(nn.Sequential):
    def __init__(self, config: ModelConfig):
        super().__init__(
            nn.Flatten(),
            nn.Linear(config.vector_dim * config.num_embeddings, config.hidden_dim),
            nn.LeakyReLU(),
            nn.Linear(config.hidden_dim, config.hidden_dim),
            nn.LeakyReLU(),
            nn.Linear(config.hidden_dim, config.image_size**2),
            nn.Sigmoid(),
            nn.Unflatten(1, (1, config.image_size, config.image_size)),
        )


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvEncoder(nn.Module):
    """``(B, channels_in, H, W)`` → ``(B, H/4, W/4, vector_dim)``, channels last for the
    quantizer. H and W must be multiples of :attr:`downsampling` (a 28×28 digit → 7×7).

    Fully convolutional: any such H×W works, though :meth:`VQVAE.decode` builds images of the
    configured ``image_size`` from codes.
    """

    #: Pixels per code along each side: two stride-2 convolutions
    downsampling = 4

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config.channels
        self.channels_in = config.channels_in
        self.body = nn.Sequential(
            nn.Conv2d(config.channels_in, c // 2, 4, stride=2, padding=1), nn.ReLU(),  # H/2
            nn.Conv2d(c // 2, c, 4, stride=2, padding=1),  # (B, c, H/4, W/4)
            ResidualBlock(c), nn.ReLU(),
            nn.Conv2d(c, config.vector_dim, 1),
        )

    def check_input(self, images: Tensor) -> None:
        """Raise ValueError unless ``images`` is a float ``(B, channels_in, H, W)`` batch with H
        and W positive multiples of :attr:`downsampling`."""
        shape, multiple = tuple(images.shape), self.downsampling
        if images.ndim != 4 or shape[1] != self.channels_in:
            raise ValueError(f"the conv model takes images (B, {self.channels_in}, H, W) "
                             f"(channels_in={self.channels_in}), got shape {shape}")
        if not images.is_floating_point():
            raise ValueError(f"the conv model takes float images in [0, 1], got {images.dtype}")
        height, width = shape[2:]
        if height < multiple or width < multiple or height % multiple or width % multiple:
            raise ValueError(
                f"the conv model takes images whose height and width are positive multiples "
                f"of {multiple} (its downsampling factor), got {height}×{width}")

    def forward(self, images: Tensor) -> Tensor:
        self.check_input(images)
        return self.body(images).permute(0, 2, 3, 1)


class ConvDecoder(nn.Module):
    """``(B, H/4, W/4, vector_dim)`` → ``(B, channels_in, H, W)`` in [0, 1]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(config.vector_dim, c, 3, padding=1),
            ResidualBlock(c), nn.ReLU(),
            nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.ReLU(),  # H/2
            nn.ConvTranspose2d(c // 2, config.channels_in, 4, stride=2, padding=1),  # H
            nn.Sigmoid(),
        )
        # Start the output near the mean pixel (sigmoid(-2) = 0.12) instead of 0.5. From 0.5,
        # Adam's first steps drive every logit far below zero to blacken the mostly-black
        # images, the sigmoid saturates and training stalls at a black image (seen at lr 2e-3
        # and 1e-3: test MSE stuck at 0.11).
        nn.init.constant_(self.body[-2].bias, -2.0)

    def forward(self, quantized: Tensor) -> Tensor:
        return self.body(quantized.permute(0, 3, 1, 2))


MODELS = {"mlp": (MLPEncoder, MLPDecoder), "conv": (ConvEncoder, ConvDecoder)}


class VQVAE(nn.Module):
    """Encoder → quantizer → decoder. Images are ``(B, 1, H, W)`` floats in [0, 1]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        encoder, decoder = MODELS[config.model]
        self.encoder = encoder(config)
        self.decoder = decoder(config)
        build, _ = QUANTIZERS[config.quantizer]
        self.quantizer = build(config.vector_dim, config.codebook_size,
                               config.quantizer_arguments())

    def forward(self, images: Tensor) -> VQVAEOutput:
        z = self.encoder(images)  # (B, num_embeddings, vector_dim)
        quantized, indices, vq_loss = self.quantizer(z)
        return VQVAEOutput(self.decoder(quantized), indices, vq_loss)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Codes of ``images``: ``(B, *code_shape)`` int64. Leaves the model's mode as it was."""
        was_training = self.training
        self.eval()
        try:
            return self.quantizer(self.encoder(images)).indices
        finally:
            self.train(was_training)

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """Images from codes ``(B, *code_shape)``: ``(B, 1, H, W)`` in [0, 1]."""
        code_shape = self.config.code_shape
        if indices.ndim != len(code_shape) + 1 or tuple(indices.shape[1:]) != code_shape:
            raise ValueError(
                f"codes must have shape (B, {', '.join(map(str, code_shape))}), "
                f"got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0
                                or int(indices.max()) >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size})")
        return self.decoder(self.quantizer.decode(indices.long()))
