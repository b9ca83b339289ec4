"""vqvae: discrete representation learning with Vector Quantized Variational Autoencoders."""

from importlib.metadata import PackageNotFoundError, version

from .quantizers import (
    FSP,
    FSQ,
    LFQ,
    BinaryMapper,
    CodebookUsage,
    EvoLFQ,
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    GroupedResidualVQ,
    LatentQuantize,
    QuantizerInputError,
    ResidualFSQ,
    ResidualLFQ,
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
    "__version__",
    "BinaryMapper",
    "codebook_usage",
    "CodebookUsage",
    "EvoLFQ",
    "FSP",
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualLFQ",
    "GroupedResidualVQ",
    "kmeans",
    "LatentQuantize",
    "LFQ",
    "nearest_code",
    "QuantizerInputError",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualVQ",
    "VectorQuantize",
    "VQOutput",
]
