"""Quantizers: modules that map vectors to discrete codes and back."""

from .binary_mapper import BinaryMapper
from .checks import QuantizerInputError
from .codebook import Codebook, CodeStatistics
from .evo_lfq import EvoLFQ
from .fsp import FSP
from .fsq import FSQ
from .guard import input_checks, raise_deferred, set_input_checks
from .hierarchical import HierarchicalVQ
from .kmeans import KMeansResult, kmeans
from .latent_quantize import LatentQuantize
from .lfq import LFQ
from .metrics import CodebookUsage, code_counts, codebook_usage
from .random_projection import RandomProjectionQuantizer
from .residual import GroupedResidualVQ, ResidualVQ
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .residual_simvq import ResidualSimVQ
from .search import nearest_code, sample_code, search_settings, set_search_defaults
from .sequential import Sequential
from .simvq import SimVQ
from .vector_quantize import VectorQuantize, VQOutput

__all__ = [
    "BinaryMapper",
    "code_counts",
    "Codebook",
    "codebook_usage",
    "CodebookUsage",
    "CodeStatistics",
    "EvoLFQ",
    "FSP",
    "FSQ",
    "GroupedResidualFSQ",
    "GroupedResidualLFQ",
    "GroupedResidualVQ",
    "HierarchicalVQ",
    "kmeans",
    "KMeansResult",
    "LatentQuantize",
    "LFQ",
    "nearest_code",
    "QuantizerInputError",
    "input_checks",
    "raise_deferred",
    "set_input_checks",
    "RandomProjectionQuantizer",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualSimVQ",
    "ResidualVQ",
    "sample_code",
    "search_settings",
    "Sequential",
    "set_search_defaults",
    "SimVQ",
    "VectorQuantize",
    "VQOutput",
]
