"""torch.compile(fullgraph=True) of the scalar and lookup-free quantizers: the compiled module
gives the eager module's outputs, indices and (after optimiser steps) parameters, in training
(forward and backward) and in eval, with no graph break.

The backend is ``aot_eager`` by default (the graph capture and autograd tracing that decide
whether a module compiles at all, without a C++ toolchain per test); ``VQVAE_COMPILE_BACKEND=
inductor`` runs the same tests through code generation."""

import pytest
import torch
from compile_support import BACKEND, CLOSE, assert_eval_equals_eager, assert_training_equals_eager

from vqvae.quantizers.fsp import FSP
from vqvae.quantizers.fsq import FSQ
from vqvae.quantizers.latent_quantize import LatentQuantize
from vqvae.quantizers.lfq import LFQ
from vqvae.quantizers.residual_fsq import GroupedResidualFSQ, ResidualFSQ
from vqvae.quantizers.residual_lfq import GroupedResidualLFQ, ResidualLFQ

pytestmark = pytest.mark.slow


MAKERS = {
    "FSQ": lambda: FSQ(levels=[5, 4, 3], dim=8),
    "FSQ-inward": lambda: FSQ(levels=[5, 4, 3], dim=8, inward_clamp=True),
    "ResidualFSQ": lambda: ResidualFSQ(dim=8, levels=[5, 4, 3], num_quantizers=2),
    "GroupedResidualFSQ": lambda: GroupedResidualFSQ(dim=8, groups=2, levels=[5, 4, 3],
                                                     num_quantizers=2),
    "LFQ": lambda: LFQ(dim=8, codebook_size=16, entropy_loss_weight=0.1),
    "ResidualLFQ": lambda: ResidualLFQ(dim=8, codebook_size=16, num_quantizers=2),
    "GroupedResidualLFQ": lambda: GroupedResidualLFQ(dim=8, groups=2, codebook_size=16,
                                                     num_quantizers=2),
    "LatentQuantize": lambda: LatentQuantize(levels=[5, 4, 3], dim=8),
    # quantize_rate=1: every entry is rounded, no noise, so both runs draw nothing at random
    "FSP": lambda: FSP(levels=[5, 4, 3], dim=8, quantize_rate=1.0),
    # channel-first feature maps (b, dim, h, w) take other paths through the same modules
    "FSQ-map": lambda: FSQ(levels=[5, 4, 3], dim=8),
    "LFQ-map": lambda: LFQ(dim=8, codebook_size=16, entropy_loss_weight=0.1),
    "LatentQuantize-map": lambda: LatentQuantize(levels=[5, 4, 3], dim=8),
    "FSP-map": lambda: FSP(levels=[5, 4, 3], dim=8, quantize_rate=1.0, channel_first=True),
}


def batch(name: str, seed: int) -> torch.Tensor:
    shape = (2, 8, 3, 3) if name.endswith("-map") else (4, 6, 8)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def objective(out) -> torch.Tensor:
    """A loss reaching every output with a gradient: the quantized values and the aux loss."""
    loss = out[0].square().mean()
    if len(out) > 2 and isinstance(out[2], torch.Tensor) and out[2].requires_grad:
        loss = loss + out[2].sum()
    return loss


def assert_same(a, b) -> None:
    torch.testing.assert_close(a[0], b[0], **CLOSE)
    assert torch.equal(a[1], b[1])
    if len(a) > 2 and isinstance(a[2], torch.Tensor):
        torch.testing.assert_close(a[2], b[2], **CLOSE)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_compiled_training_equals_eager(name):
    assert_training_equals_eager(MAKERS[name], lambda step: batch(name, step), objective,
                                 assert_same)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_compiled_eval_equals_eager(name):
    assert_eval_equals_eager(MAKERS[name], lambda seed: batch(name, seed), assert_same)


@pytest.mark.parametrize("name", ["FSQ", "ResidualFSQ", "LFQ"])
def test_compiled_call_turns_inf_into_nan_not_a_code(name):
    """Eager calls raise on Inf; a compiled call cannot, and gives NaN where the Inf was
    instead of the valid code a bounded activation would make of it."""
    torch.manual_seed(0)
    module = MAKERS[name]().eval()
    x = torch.randn(2, 3, 8)
    x[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN|non-finite|infinite"):
        module(x)
    out = torch.compile(module, fullgraph=True, backend=BACKEND)(x)
    assert torch.isnan(out[0][0, 1]).any()
    assert torch.isfinite(out[0][1]).all()  # other positions are untouched
