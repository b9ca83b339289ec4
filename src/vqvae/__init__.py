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
    input_checks,
    kmeans,
    nearest_code,
    raise_deferred,
    set_input_checks,
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
    "input_checks",
    "kmeans",
    "LatentQuantize",
    "LFQ",
    "nearest_code",
    "QuantizerInputError",
    "raise_deferred",
    "RandomProjectionQuantizer",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualSimVQ",
    "ResidualVQ",
    "Sequential",
    "set_input_checks",
    "SimVQ",
    "VectorQuantize",
    "VQOutput",
]
