"""Quantizers: modules that map vectors to discrete codes and back."""

from .binary_mapper import BinaryMapper
from .evo_lfq import EvoLFQ
from .fsp import FSP
from .fsq import FSQ
from .kmeans import KMeansResult, kmeans
from .latent_quantize import LatentQuantize
from .lfq import LFQ
from .metrics import CodebookUsage, code_counts, codebook_usage
from .residual import GroupedResidualVQ, ResidualVQ
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .search import nearest_code, sample_code, search_settings, set_search_defaults
from .vector_quantize import QuantizerInputError, VectorQuantize, VQOutput

__all__ = [
    "BinaryMapper",
    "code_counts",
    "codebook_usage",
    "CodebookUsage",
    "EvoLFQ",
    "FSP",
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualLFQ",
    "GroupedResidualVQ",
    "kmeans",
    "KMeansResult",
    "LatentQuantize",
    "LFQ",
    "nearest_code",
    "QuantizerInputError",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualVQ",
    "sample_code",
    "search_settings",
    "set_search_defaults",
    "VectorQuantize",
    "VQOutput",
]
