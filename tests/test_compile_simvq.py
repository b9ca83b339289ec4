"""torch.compile(fullgraph=True) of SimVQ, ResidualSimVQ and the other quantizers of their family
(random projection, binary mapper, EvoLFQ, Sequential, hierarchical), and their device-side rule
for non-finite input.

A compiled call must not read back, so it takes the deferred path of
:mod:`vqvae.quantizers.guard`; the reference is therefore the eager module under
``input_checks("deferred")`` (the same algorithm and the same random draws: quantize dropout is
drawn on the device in both). Backend ``aot_eager`` by default (graph capture and autograd
tracing, with eager kernels and so eager random numbers); ``VQVAE_COMPILE_BACKEND=inductor`` runs
the deterministic cases through code generation too.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from compile_support import BACKEND, CLOSE, assert_eval_equals_eager, assert_training_equals_eager
from torch import nn

from vqvae.quantizers import guard
from vqvae.quantizers.binary_mapper import BinaryMapper
from vqvae.quantizers.checks import QuantizerInputError
from vqvae.quantizers.evo_lfq import EvoLFQ
from vqvae.quantizers.hierarchical import HierarchicalVQ
from vqvae.quantizers.random_projection import RandomProjectionQuantizer
from vqvae.quantizers.residual_simvq import ResidualSimVQ
from vqvae.quantizers.sequential import Sequential
from vqvae.quantizers.simvq import SimVQ

pytestmark = pytest.mark.slow


MAKERS = {
    "SimVQ": lambda: SimVQ(dim=8, codebook_size=32),
    # straight-through, a wider frozen codebook, a custom transform (plain autograd path)
    "SimVQ-straight": lambda: SimVQ(dim=8, codebook_size=32, rotation_trick=False,
                                    frozen_codebook_dim=12),
    "SimVQ-mlp": lambda: SimVQ(dim=8, codebook_size=32, codebook_transform=nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))),
    "SimVQ-map": lambda: SimVQ(dim=8, codebook_size=32, channel_first=True),
    "SimVQ-kmeans": lambda: SimVQ(dim=8, codebook_size=32, kmeans_init=True),
    "ResidualSimVQ": lambda: ResidualSimVQ(dim=8, codebook_size=32, num_quantizers=3),
    "ResidualSimVQ-kmeans": lambda: ResidualSimVQ(dim=8, codebook_size=32, num_quantizers=2,
                                                  kmeans_init=True),
    # depth drawn per call: on the device in both runs, from the same generator state
    "ResidualSimVQ-dropout": lambda: ResidualSimVQ(
        dim=8, codebook_size=32, num_quantizers=4, quantize_dropout=True,
        quantize_dropout_cutoff_index=1),
    "RandomProjection": lambda: RandomProjectionQuantizer(dim=8, codebook_size=32,
                                                          codebook_dim=6, num_codebooks=2),
    "BinaryMapper": lambda: BinaryMapper(bits=4),
    "EvoLFQ": lambda: EvoLFQ(nn.Linear(8, 4), nn.Linear(4, 8), dim=4, codebook_size=16,
                             entropy_loss_weight=0.1),
    "Sequential": lambda: Sequential(nn.Linear(8, 8), SimVQ(dim=8, codebook_size=32),
                                     nn.Linear(8, 8)),
    "HierarchicalVQ": lambda: HierarchicalVQ(dim=8, codebook_size=16, scales=(1, 2, 4),
                                             kmeans_init=False, nested_dropout=0.5),
}
#: Classes that wrap this project's VectorQuantize, which must compile first.
#: Cases that draw random numbers in training (inductor's generator differs from eager's).
RANDOM = {"ResidualSimVQ-dropout", "BinaryMapper", "HierarchicalVQ", "SimVQ-kmeans",
          "ResidualSimVQ-kmeans"}


def batch(name: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "SimVQ-map":
        return torch.randn(2, 8, 3, 3, generator=g)
    if name == "BinaryMapper":
        return torch.randn(4, 6, 4, generator=g)
    if name == "EvoLFQ":
        return torch.randn(5, 8, generator=g)
    if name == "HierarchicalVQ":
        return torch.randn(2, 8, 4, generator=g)  # (B, C, L)
    return torch.randn(4, 6, 8, generator=g)


def call(module, name: str, x):
    if name == "BinaryMapper":
        return module(x, return_indices=True)
    return module(x)


def tensors(out) -> list[torch.Tensor]:
    """Every tensor of an output, nested tuples flattened."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out if item is not None for t in tensors(item)]


def objective(out) -> torch.Tensor | None:
    """A loss reaching every float output that has a gradient (the quantized values and the
    losses), or None when nothing has one (a quantizer that only labels)."""
    terms = [t.float().square().mean() if t.ndim else t.float()
             for t in tensors(out) if t.is_floating_point() and t.requires_grad]
    return sum(terms) if terms else None


def assert_same(a, b) -> None:
    for ta, tb in zip(tensors(a), tensors(b), strict=True):
        if ta.is_floating_point():
            torch.testing.assert_close(ta, tb, **CLOSE, equal_nan=True)
        else:
            assert torch.equal(ta, tb)


def skip_unless_deterministic(name: str) -> None:
    if BACKEND != "aot_eager" and name in RANDOM:
        pytest.skip("the compiled code draws from another random stream than eager kernels")


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_compiled_training_equals_deferred_eager(name):
    skip_unless_deterministic(name)
    assert_training_equals_eager(MAKERS[name], lambda step: batch(name, step), objective,
                                 assert_same, call=lambda m, x: call(m, name, x),
                                 checks="deferred")


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_compiled_eval_equals_eager(name):
    skip_unless_deterministic(name)
    assert_eval_equals_eager(MAKERS[name], lambda seed: batch(name, seed), assert_same,
                             call=lambda m, x: call(m, name, x))


@pytest.mark.parametrize("backend", ["torch", "c"])
def test_compiled_simvq_on_each_cpu_search_backend(backend):
    """The chunked matmul search and the C kernel (a custom op inside the graph): the compiled
    training steps give the eager indices on both."""
    from vqvae.quantizers import cpu_kernel
    from vqvae.quantizers.search import search_settings

    if backend == "c" and not cpu_kernel.available():
        pytest.skip("the C kernel does not build here")
    with search_settings(backend=backend):
        test_compiled_training_equals_deferred_eager("ResidualSimVQ")
        graphs = []

        def record(graph_module, example_inputs):
            graphs.append(str(graph_module.graph))
            return graph_module.forward

        torch._dynamo.reset()
        torch.compile(SimVQ(dim=8, codebook_size=32), fullgraph=True, backend=record)(
            torch.randn(4, 8))
    assert len(graphs) == 1  # one graph, and the search is in it as one op or as a matmul
    assert ("nearest_code_cpu" in graphs[0]) == (backend == "c")


def test_compiled_simvq_with_quantize_dropout_drops_layers():
    """The compiled residual quantizer really drops: over a few calls some layers are -1 with
    loss 0, the first ``cutoff + 1`` never, and the output is the sum of the kept layers."""
    torch.manual_seed(1)
    rvq = ResidualSimVQ(dim=8, codebook_size=32, num_quantizers=4, quantize_dropout=True,
                        quantize_dropout_cutoff_index=1).train()
    compiled = torch.compile(rvq, fullgraph=True, backend="aot_eager")
    depths = set()
    for step in range(12):
        quantized, indices, losses = compiled(batch("ResidualSimVQ", step))
        kept = (indices[0, 0] >= 0).sum().item()
        depths.add(kept)
        assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()
        assert (losses[:kept] > 0).all() and (losses[kept:] == 0).all()
        torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized.detach())
    assert depths <= {2, 3, 4} and len(depths) >= 2


# ---------------------------------------------------------------------------- device-side rules


def test_deferred_dropout_depth_is_uniform_and_masks_the_dropped_layers():
    """The on-device draw: ``last`` uniform over [cutoff, q) (each of 3 values within 0.1 of
    1/3 over 600 calls), rounded up to ``quantize_dropout_multiple_of``."""
    torch.manual_seed(2)
    rvq = ResidualSimVQ(dim=4, codebook_size=8, num_quantizers=4, quantize_dropout=True,
                        quantize_dropout_cutoff_index=1).train()
    x = torch.randn(3, 4)
    counts = torch.zeros(5)
    with guard.input_checks("deferred"), torch.no_grad():
        for _ in range(600):
            _, indices, losses = rvq(x)
            kept = int((indices[0] >= 0).sum())
            counts[kept] += 1
            assert torch.equal(indices[:, kept:], torch.full((3, 4 - kept), -1))
            assert (losses[kept:] == 0).all() and (losses[:kept] > 0).all()
    assert counts[:2].sum() == 0 and counts[2:].sum() == 600
    assert ((counts[2:] / 600 - 1 / 3).abs() < 0.1).all(), counts

    rvq = ResidualSimVQ(dim=4, codebook_size=8, num_quantizers=4, quantize_dropout=True,
                        quantize_dropout_multiple_of=2).train()
    with guard.input_checks("deferred"), torch.no_grad():
        depths = {int((rvq(x)[1][0] >= 0).sum()) for _ in range(60)}
    assert depths == {2, 4}  # last ∈ {0, 1, 2, 3} rounds up to 1 or 3


@pytest.mark.parametrize("rotation", [True, False])
def test_deferred_simvq_gradients_match_the_textbook_autograd(rotation):
    """The fixed-shape gradient of the linear map (no torch.unique) in float64 autograd terms:
    the codebook ``frozen · Wᵀ``, the picked rows, loss ``0.5 · (mse(sg x, q) + 0.3 mse(x, sg q))``
    (and the straight-through output when ``rotation`` is off)."""
    torch.manual_seed(3)
    vq = SimVQ(dim=6, codebook_size=10, rotation_trick=rotation, commitment_weight=0.5,
               input_to_quantize_commit_loss_weight=0.3)
    x = torch.randn(40, 6, requires_grad=True)
    with guard.input_checks("deferred"):
        quantized, indices, loss = vq(x)
    (quantized.sum() * 0 + loss).backward()

    weight = vq.code_transform.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    codebook = vq.frozen_codebook.double() @ weight.t()
    assert torch.equal(torch.cdist(x64.detach(), codebook.detach()).argmin(-1), indices)
    q = codebook[indices]
    ref = 0.5 * (F.mse_loss(x64.detach(), q) + 0.3 * F.mse_loss(x64, q.detach()))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(vq.code_transform.weight.grad.double(), weight.grad,
                               rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


def nan_batch(shape=(4, 6, 8)) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    x[1, 2, 3] = float("nan")
    x[2, 0, 0] = float("inf")
    return x


@pytest.mark.parametrize("name", ["SimVQ", "SimVQ-kmeans", "ResidualSimVQ",
                                  "ResidualSimVQ-dropout"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_deferred_nan_batch_changes_nothing_and_is_reported(name, compiled):
    torch.manual_seed(4)
    module = MAKERS[name]().train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    run = torch.compile(module, fullgraph=True, backend="aot_eager") if compiled else module
    x = nan_batch()
    with guard.input_checks("deferred"):
        quantized, _, loss = run(x)  # no error here: nothing was read back
    assert not torch.isfinite(loss).all()
    # NaN where the input was not finite, the codes elsewhere
    assert torch.isnan(quantized[1, 2, 3]) and torch.isnan(quantized[2, 0, 0])
    assert torch.isfinite(quantized[0]).all() and torch.isfinite(quantized[3]).all()
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(QuantizerInputError, match="non-finite.*changed no quantizer state"):
        guard.raise_deferred(module)
    guard.raise_deferred(module)  # reported once: the counts were reset

    # a finite batch after it is counted as nothing
    with guard.input_checks("deferred"):
        run(torch.randn(4, 6, 8))
    guard.raise_deferred(module)


def test_deferred_eval_call_gives_nan_and_counts_nothing():
    torch.manual_seed(6)
    vq = SimVQ(dim=8, codebook_size=32).eval()
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        quantized, _, loss = compiled(nan_batch())
    assert torch.isnan(quantized[1, 2, 3]) and torch.isnan(quantized[2, 0, 0])
    assert torch.isfinite(quantized[0]).all() and not torch.isfinite(loss)
    guard.raise_deferred(vq)  # eval calls change nothing, so they are not counted
    with pytest.raises(QuantizerInputError, match="non-finite"):  # the immediate rule stands
        vq(nan_batch())


def test_deferred_random_projection_labels_non_finite_rows_minus_one():
    torch.manual_seed(7)
    rpq = RandomProjectionQuantizer(dim=8, codebook_size=32, codebook_dim=6, num_codebooks=2)
    x = nan_batch()
    compiled = torch.compile(rpq, fullgraph=True, backend="aot_eager")
    for indices in (compiled(x), _deferred(rpq, x)):
        assert torch.equal(indices[1, 2], torch.tensor([-1, -1]))
        assert torch.equal(indices[2, 0], torch.tensor([-1, -1]))
        clean = torch.ones(4, 6, dtype=torch.bool)
        clean[1, 2] = clean[2, 0] = False
        assert (indices[clean] >= 0).all()
        assert torch.equal(indices[clean], rpq(x.nan_to_num(0.0, 0.0, 0.0))[clean])
    with pytest.raises(QuantizerInputError, match="non-finite"):
        rpq(x)


def _deferred(module, *args, **kwargs):
    with guard.input_checks("deferred"):
        return module(*args, **kwargs)


def test_deferred_binary_mapper_gives_nan_rows():
    torch.manual_seed(8)
    mapper = BinaryMapper(bits=4).train()
    logits = torch.randn(5, 4)
    logits[1, 2] = float("nan")
    logits[3, 0] = -float("inf")
    compiled = torch.compile(mapper, fullgraph=True, backend="aot_eager")
    for one_hot, indices, _ in (compiled(logits, return_indices=True),
                                _deferred(mapper, logits, return_indices=True)):
        assert torch.isnan(one_hot[[1, 3]]).all()
        assert torch.isfinite(one_hot[[0, 2, 4]]).all()
        assert ((indices >= 0) & (indices < 16)).all()
    with pytest.raises(QuantizerInputError, match="NaN or infinite"):
        mapper(logits)


def test_deferred_hierarchical_nested_dropout_keeps_a_prefix_of_levels():
    """The on-device cutoff of nested dropout: the reconstruction is the running sum up to the
    cutoff level and the loss the mean of those levels' losses, as the eager draw gives."""
    torch.manual_seed(9)
    hvq = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4), nested_dropout=0.5,
                         kmeans_init=False, decay=0.5, threshold_ema_dead_code=0)
    x = torch.randn(2, 4, 4)
    seen = set()
    for seed in range(16):
        probe = copy.deepcopy(hvq).eval()  # the levels of this call, all of them
        with torch.no_grad():
            h, levels = x, []
            for level, shape in enumerate(probe.level_shapes):
                q, _, loss = probe._quantize_level(level, probe._pool(h, shape, None)[0], None)
                u = probe.upsample_to_full(q, (4,), level)
                h = h - u
                levels.append((u, loss))
        torch.manual_seed(seed)
        model = copy.deepcopy(hvq).train()
        model.vq.eval()  # no codebook update, so the levels match the probe's
        with guard.input_checks("deferred"), torch.no_grad():
            recon, _, loss, cutoff = model(x, return_cutoff=True)
        last = int(cutoff) if int(cutoff) >= 0 else 2
        seen.add(int(cutoff))
        expected = sum(u for u, _ in levels[:last + 1])
        torch.testing.assert_close(recon, expected)
        torch.testing.assert_close(loss, torch.stack([lv for _, lv in levels[:last + 1]]).mean())
    assert seen <= {-1, 0, 1} and len(seen) == 3


def test_hierarchical_mask_is_refused_while_compiled_and_works_deferred():
    torch.manual_seed(10)
    hvq = HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2), kmeans_init=False).eval()
    x, mask = torch.randn(2, 4, 4), torch.tensor([[True, True, False, False]] * 2)
    compiled = torch.compile(hvq, fullgraph=True, backend="aot_eager")
    # (a fullgraph trace reports an exception of the traced code as Unsupported, naming it)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="mask.*compiled graph"):
        compiled(x, mask=mask)
    deferred = _deferred(hvq, x, mask=mask)
    immediate = hvq(x, mask=mask)
    torch.testing.assert_close(deferred[0], immediate[0])
    assert all(torch.equal(a, b) for a, b in zip(deferred[1], immediate[1], strict=True))
    assert (deferred[0][..., 2:] == 0).all() and (deferred[1][1][:, 1] == -1).all()


@pytest.mark.skipif(BACKEND != "inductor", reason="set VQVAE_COMPILE_BACKEND=inductor")
def test_inductor_simvq_training_equals_eager():
    """One code-generating run (deterministic: no dropout), compared after SGD steps."""
    test_compiled_training_equals_deferred_eager("ResidualSimVQ")
