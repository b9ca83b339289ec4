"""Quantizers: modules that map vectors to discrete codes and back."""

from .checks import QuantizerInputError
from .codebook import Codebook, CodeStatistics
from .fsp import FSP
from .fsq import FSQ
from .kmeans import KMeansResult, kmeans
from .latent_quantize import LatentQuantize
from .metrics import CodebookUsage, code_counts, codebook_usage
from .residual import GroupedResidualVQ, ResidualVQ
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .search import nearest_code, sample_code, search_settings, set_search_defaults
from .vector_quantize import VectorQuantize, VQOutput

__all__ = [
    "CodeStatistics",
    "Codebook",
    "CodebookUsage",
    "FSP",
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualVQ",
    "KMeansResult",
    "LatentQuantize",
    "QuantizerInputError",
    "ResidualFSQ",
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
