"""Quantizers: modules that map vectors to discrete codes and back."""

from .hierarchical import HierarchicalVQ
from .kmeans import KMeansResult, kmeans
from .metrics import CodebookUsage, code_counts, codebook_usage
from .random_projection import RandomProjectionQuantizer
from .residual import GroupedResidualVQ, ResidualVQ
from .residual_simvq import ResidualSimVQ
from .search import nearest_code, sample_code, search_settings, set_search_defaults
from .sequential import Sequential
from .simvq import SimVQ
from .vector_quantize import QuantizerInputError, VectorQuantize, VQOutput

__all__ = [
    "CodebookUsage",
    "GroupedResidualVQ",
    "HierarchicalVQ",
    "KMeansResult",
    "QuantizerInputError",
    "RandomProjectionQuantizer",
    "ResidualSimVQ",
    "ResidualVQ",
    "Sequential",
    "SimVQ",
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
