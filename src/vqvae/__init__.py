"""vqvae: discrete representation learning with Vector Quantized Variational Autoencoders."""

from importlib.metadata import PackageNotFoundError, version

from .quantizers import (
    FSP,
    FSQ,
    LFQ,
    BinaryMapper,
    Codebook,
    CodebookUsage,
    EvoLFQ,
    GroupedResidualFSQ,
    GroupedResidualLFQ,
    GroupedResidualVQ,
    HierarchicalVQ,
    LatentQuantize,
    QuantizerInputError,
    RandomProjectionQuantizer,
    ResidualFSQ,
    ResidualLFQ,
    ResidualSimVQ,
    ResidualVQ,
    Sequential,
    SimVQ,
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
    "Codebook",
    "codebook_usage",
    "CodebookUsage",
    "EvoLFQ",
    "FSP",
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualLFQ",
    "GroupedResidualVQ",
    "HierarchicalVQ",
    "kmeans",
    "LatentQuantize",
    "LFQ",
    "nearest_code",
    "QuantizerInputError",
    "RandomProjectionQuantizer",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualSimVQ",
    "ResidualVQ",
    "Sequential",
    "SimVQ",
    "VectorQuantize",
    "VQOutput",
]
