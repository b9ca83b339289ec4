"""Quantizers: modules that map vectors to discrete codes and back."""

from .binary_mapper import BinaryMapper
from .evo_lfq import EvoLFQ
from .kmeans import KMeansResult, kmeans
from .lfq import LFQ
from .metrics import CodebookUsage, code_counts, codebook_usage
from .residual import GroupedResidualVQ, ResidualVQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .search import nearest_code, sample_code, search_settings, set_search_defaults
from .vector_quantize import QuantizerInputError, VectorQuantize, VQOutput

__all__ = [
    "BinaryMapper",
    "EvoLFQ",
    "GroupedResidualLFQ",
    "LFQ",
    "ResidualLFQ",
    "CodebookUsage",
    "GroupedResidualVQ",
    "KMeansResult",
    "QuantizerInputError",
    "ResidualVQ",
    "VQOutput",
    "VectorQuantize",
    "code_counts",
    "codebook_usage",
    "kmeans",
    "nearest_code",
    "sample_code",
    "search_settings",
    "set_search_defaults",
]
