"""vqvae: discrete representation learning with Vector Quantized Variational Autoencoders."""

from importlib.metadata import PackageNotFoundError, version

from .quantizers import (
    FSP,
    FSQ,
    Codebook,
    CodebookUsage,
    GroupedResidualFSQ,
    GroupedResidualVQ,
    LatentQuantize,
    QuantizerInputError,
    ResidualFSQ,
    ResidualVQ,
    VectorQuantize,
    VQOutput,
    codebook_usage,
    kmeans,
    nearest_code,
)

try:
    __version__ = version("vqvae")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Codebook",
    "CodebookUsage",
    "FSP",
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualVQ",
    "LatentQuantize",
    "QuantizerInputError",
    "ResidualFSQ",
    "ResidualVQ",
    "VQOutput",
    "VectorQuantize",
    "__version__",
    "codebook_usage",
    "kmeans",
    "nearest_code",
]
