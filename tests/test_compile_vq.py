"""torch.compile(fullgraph=True) of VectorQuantize: a compiled training call (forward, backward,
EMA or learnable codebook, k-means initialisation, dead-code restarts) leaves the module in the
state an eager call with deferred input checks leaves it in (the same algorithm, so the same
random draws), through the C kernel's custom ops and through torch operations alike.

The backend is ``aot_eager`` by default: the graph capture and autograd tracing decide whether
the module compiles, and the random draws match eager ones. ``VQVAE_COMPILE_BACKEND=inductor``
runs the deterministic cases through code generation (its random numbers differ from eager's).
"""

import copy

import numpy as np
import pytest
import torch
from compile_support import (
    BACKEND,
    CLOSE,
    STEPS,
    assert_deferred_equals_immediate,
    assert_same_run,
    batch,
    run_deferred_pair,
)

import vqvae
from vqvae.quantizers import cpu_kernel
from vqvae.quantizers.codebook import Codebook
from vqvae.quantizers.kmeans import kmeans_fixed
from vqvae.quantizers.vector_quantize import VectorQuantize

CONFIGS = {
    "ema": dict(),
    "kmeans": dict(kmeans_init=True, kmeans_iters=3),
    "dead-codes": dict(threshold_ema_dead_code=2.0, dead_code_warmup_steps=1),
    "kmeans-dead-cosine": dict(kmeans_init=True, kmeans_iters=2, use_cosine_sim=True,
                               threshold_ema_dead_code=1.0),
    "learnable": dict(decay=None, rotation_trick=False),
    "learnable-dead": dict(decay=None, threshold_ema_dead_code=1.0),
    "heads-separate": dict(heads=2, separate_codebook_per_head=True,
                           threshold_ema_dead_code=1.0),
    "heads-separate-ema": dict(heads=2, separate_codebook_per_head=True),
    "heads-shared-proj": dict(heads=2, codebook_dim=4, kmeans_init=True, kmeans_iters=2),
    "sampled": dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "affine": dict(affine_param=True),
    "orthogonal": dict(orthogonal_reg_weight=0.1, orthogonal_reg_max_codes=8),
    "cross-entropy": dict(commitment_use_cross_entropy_loss=True),
    "bridge": lambda: dict(vq_bridge=torch.nn.Linear(16, 16)),
    "diveq": dict(directional_reparam=True, threshold_ema_dead_code=1.0),
    "gumbel": dict(straight_through=True, rotation_trick=False),
    "sync-update-v": dict(decay=None, sync_update_v=0.5),
}
# what inductor can compare to eager: no random draw in any call
DETERMINISTIC = ("ema", "learnable", "heads-separate-ema", "affine")


def make(name: str) -> VectorQuantize:
    torch.manual_seed(0)
    options = CONFIGS[name]() if callable(CONFIGS[name]) else CONFIGS[name]
    return VectorQuantize(dim=16, codebook_size=32, **options)


class Recorder:
    """A backend that keeps the FX graphs dynamo captured, then hands them to ``BACKEND``."""

    def __init__(self):
        self.graphs = []
        self.inner = torch._dynamo.lookup_backend(BACKEND)

    def __call__(self, gm, inputs):
        self.graphs.append(gm)
        return self.inner(gm, inputs)

    def code(self) -> str:
        return "\n".join(str(g.graph) for g in self.graphs)


@pytest.fixture(params=["c-kernel", "torch"])
def kernel(request, monkeypatch):
    if request.param == "c-kernel":
        if not cpu_kernel.available():
            pytest.skip(f"C kernel unavailable: {cpu_kernel.unavailable_reason()}")
    else:
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    return request.param


def run_both(name: str, steps: int = STEPS, *, mask_of=None, train: bool = True,
             call=None):
    """Eager (deferred checks) and compiled copies of one layer, called alike ``steps`` times
    with the same seed before each call; returns both modules, their outputs and the graphs."""
    eager = make(name).train(train)
    compiled_module = copy.deepcopy(eager)
    recorder = Recorder()
    compiled = torch.compile(compiled_module, fullgraph=True, backend=recorder)

    def kwargs_of(step: int) -> dict:
        kwargs = {} if mask_of is None else {"mask": mask_of(step)}
        kwargs.update(call or {})
        return kwargs

    outputs = run_deferred_pair(eager, compiled, steps, train=train, kwargs_of=kwargs_of)
    return eager, compiled_module, outputs, recorder




@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_training_equals_eager_deferred(name, kernel):
    if BACKEND != "aot_eager" and name not in DETERMINISTIC:
        pytest.skip("random draws of this backend differ from eager ones")
    eager, compiled_module, outputs, recorder = run_both(name)
    assert_same_run(eager, compiled_module, outputs)
    assert int(eager.steps) == STEPS
    # the C kernel's ops are in the graph exactly when the kernel is used
    uses_op = "nearest_code_cpu" in recorder.code()
    searched_by_logits = ("sampled", "cross-entropy", "gumbel")
    assert uses_op == (kernel == "c-kernel" and name not in searched_by_logits)


@pytest.mark.slow
@pytest.mark.parametrize("call", [
    dict(ema_update_weight=torch.linspace(0.0, 1.0, 32)),
    dict(ema_update_weight=lambda sums, counts: (counts > 0).to(sums.dtype)),
    dict(ema_update=False),
    dict(lens=torch.tensor([12, 5, 7, 1])),
    dict(return_loss_breakdown=True),
], ids=["weight-tensor", "weight-function", "no-ema", "lens", "breakdown"])
def test_compiled_forward_keywords_equal_eager_deferred(call):
    eager, compiled_module, outputs, _ = run_both("dead-codes", call=call)
    assert_same_run(eager, compiled_module, outputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kmeans", "kmeans-dead-cosine"])
def test_compiled_kmeans_initialises_once_then_recompiles_once(name):
    eager, compiled_module, outputs, recorder = run_both(name)
    assert bool(compiled_module.initialized) and bool(eager.initialized)
    assert not compiled_module.book.kmeans_pending
    # one graph with k-means for the first call, one without it for the others
    assert len(recorder.graphs) == 2
    assert_same_run(eager, compiled_module, outputs)
    # k-means moved the codes off their zero start onto the data
    assert compiled_module.codebook.abs().sum(-1).min() > 0


@pytest.mark.slow
def test_dead_codes_are_restarted_in_the_compiled_graph():
    eager, compiled_module, outputs, _ = run_both("dead-codes", steps=4)
    assert_same_run(eager, compiled_module, outputs)
    # one controlled step: the EMA frozen (decay 1), three codes made dead by hand
    torch.manual_seed(0)
    layer = VectorQuantize(dim=16, codebook_size=32, decay=1.0, threshold_ema_dead_code=1.0)
    dead = torch.tensor([3, 7, 30])
    with torch.no_grad():
        layer.book.cluster_size[0, dead] = 0.1
        layer.codebook = layer.codebook.clone()  # EMA sums that keep the codes in place
    before = layer.codebook.clone()
    x = batch(5)
    torch.compile(layer, fullgraph=True, backend=BACKEND)(x)
    alive = torch.ones(32, dtype=torch.bool)
    alive[dead] = False
    torch.testing.assert_close(layer.codebook[alive], before[alive])
    rows = x.reshape(-1, 16)
    picked = [int(torch.nonzero((rows == code).all(-1))[0]) for code in layer.codebook[dead]]
    assert len(set(picked)) == 3  # each dead code sits on a distinct input row
    assert layer.cluster_size[dead].tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(layer.book.embed_avg[0, dead], layer.codebook[dead])


@pytest.mark.slow
def test_compiled_masked_training_equals_eager_deferred():
    def mask_of(step):
        mask = torch.ones(4, 12, dtype=torch.bool)
        mask[step % 4, 5 + step:] = False
        return mask

    eager, compiled_module, outputs, _ = run_both("dead-codes", mask_of=mask_of)
    assert_same_run(eager, compiled_module, outputs)
    for pair in outputs:
        indices = pair[1][0][1]
        assert (indices == -1).sum() > 0  # padding positions carry -1


@pytest.mark.slow
def test_compiled_mask_matches_the_row_dropping_eager_path():
    """The fixed-shape masked path (all rows, padding weighted 0) against the immediate one
    (padding rows dropped): same codes, output, loss and EMA state, without random draws."""
    torch.manual_seed(0)
    eager = VectorQuantize(dim=16, codebook_size=32, decay=0.5).train()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=BACKEND)
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, 9:] = False
    for step in range(2):
        x = batch(step)
        with vqvae.input_checks("immediate"):
            a = eager(x, mask=mask)
        b = compiled(x, mask=mask)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0], **CLOSE)
        torch.testing.assert_close(a[2], b[2], **CLOSE)
    torch.testing.assert_close(eager.codebook, compiled_module.codebook, **CLOSE)
    torch.testing.assert_close(eager.cluster_size, compiled_module.cluster_size, **CLOSE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ema", "affine", "heads-shared-proj"])
def test_compiled_eval_equals_eager_and_changes_nothing(name, kernel):
    eager, compiled_module, outputs, _ = run_both(name, steps=2, train=False)
    before = make(name).eval()
    for key, value in before.state_dict().items():
        assert torch.equal(value, compiled_module.state_dict()[key]), key
    assert_same_run(eager, compiled_module, outputs)


@pytest.mark.slow
def test_compiled_eval_gives_nan_for_non_finite_rows_and_counts_nothing():
    layer = make("ema").eval()
    x = batch(0)
    x[1, 2, 3] = float("inf")
    x[2, 5, 0] = float("nan")
    out = torch.compile(layer, fullgraph=True, backend=BACKEND)(x)
    bad = torch.zeros(4, 12, dtype=torch.bool)
    bad[1, 2] = bad[2, 5] = True
    assert torch.isnan(out[0][bad]).all()
    assert torch.isfinite(out[0][~bad]).all()
    assert int(layer.nonfinite_calls) == 0  # eval changes nothing, counters included


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ema", "kmeans-dead-cosine", "learnable-dead", "affine"])
def test_compiled_non_finite_batch_changes_no_buffer_and_raises_at_read_back(name):
    layer = make(name).train()
    compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)
    compiled(batch(0))  # compiled (and, with k-means, initialised) on a good batch
    vqvae.raise_deferred(layer)
    before = {k: v.clone() for k, v in layer.named_buffers()}
    x = batch(1)
    x[0, 0, 0] = float("nan")
    out = compiled(x)
    for key, value in layer.named_buffers():
        if key != "nonfinite_calls":
            assert torch.equal(value, before[key]), key
    assert not torch.isfinite(out[2]).all() or torch.isnan(out[0]).any()
    with pytest.raises(vqvae.quantizers.QuantizerInputError, match="non-finite"):
        vqvae.raise_deferred(layer)


@pytest.mark.slow
def test_topk_compiles_in_eval():
    layer = make("ema").eval()
    compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)
    x = batch(3)
    a, b = layer(x, topk=3), compiled(x, topk=3)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], **CLOSE)


@pytest.mark.slow
def test_compiled_in_place_optimizer_is_refused_with_a_clear_error():
    layer = VectorQuantize(dim=8, codebook_size=16, decay=None,
                           in_place_codebook_optimizer=torch.optim.SGD).train()
    with pytest.raises(Exception, match="in_place_codebook_optimizer cannot be compiled"):
        torch.compile(layer, fullgraph=True, backend=BACKEND)(torch.randn(2, 3, 8))


# ---------------------------------------------------------------------------- deferred eager


@pytest.mark.parametrize("name", ["ema", "kmeans-dead-cosine", "learnable-dead", "affine",
                                  "heads-separate"])
def test_deferred_non_finite_batch_changes_no_buffer_and_raises_at_read_back(name):
    layer = make(name).train()
    with vqvae.input_checks("deferred"):
        layer(batch(0))
        vqvae.raise_deferred(layer)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        # 1e30: its square overflows (but a unit row of it is fine for cosine similarity)
        bad_values = (float("nan"), float("inf")) if layer.use_cosine_sim \
            else (float("nan"), float("inf"), 1e30)
        for bad in bad_values:
            x = batch(1)
            x[2, 3, 4] = bad
            out = layer(x)
            assert torch.isnan(out[0][2, 3]).all()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    calls = len(bad_values)
    assert int(layer.nonfinite_calls) == calls
    with pytest.raises(vqvae.quantizers.QuantizerInputError, match=rf"\({calls} call\(s\)\)"):
        vqvae.raise_deferred(layer)


def test_deferred_refused_first_batch_leaves_kmeans_undone():
    layer = make("kmeans").train()
    x = batch(0)
    x[0, 0, 0] = float("nan")
    with vqvae.input_checks("deferred"):
        layer(x)
    assert not bool(layer.initialized) and not layer.codebook.any()
    with pytest.raises(vqvae.quantizers.QuantizerInputError):
        vqvae.raise_deferred(layer)
    # on the CPU the flag is read from the buffer again: the next good batch initialises
    with vqvae.input_checks("deferred"):
        layer(batch(1))
    assert bool(layer.initialized) and layer.codebook.abs().sum(-1).min() > 0


@pytest.mark.parametrize("name", ["ema", "learnable", "heads-separate-ema", "affine"])
def test_deferred_equals_immediate_without_random_draws(name):
    assert_deferred_equals_immediate(lambda: make(name))


def test_deferred_masked_call_equals_the_row_dropping_path():
    immediate = VectorQuantize(dim=16, codebook_size=32, decay=0.5, commitment_weight=2.0,
                               rotation_trick=False)
    deferred = copy.deepcopy(immediate)
    mask = torch.rand(4, 12, generator=torch.Generator().manual_seed(3)) > 0.3
    x = batch(4).requires_grad_()
    with vqvae.input_checks("immediate"):
        a = immediate(x, mask=mask)
    with vqvae.input_checks("deferred"):
        b = deferred(x, mask=mask)
    assert torch.equal(a[1], b[1]) and (b[1][~mask] == -1).all()
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[2], b[2])
    grad_a, = torch.autograd.grad(a[0].sum() + a[2], x)
    grad_b, = torch.autograd.grad(b[0].sum() + b[2], x)
    torch.testing.assert_close(grad_a, grad_b)
    torch.testing.assert_close(immediate.codebook, deferred.codebook)


def test_kmeans_pending_follows_a_loaded_state_dict():
    trained = make("kmeans").train()
    trained(batch(0))
    fresh = make("kmeans")
    assert fresh.book.kmeans_pending and not fresh.book._initted_known
    fresh.load_state_dict(trained.state_dict())
    assert fresh.book._initted_known and not fresh.book.kmeans_pending


def test_fixed_kmeans_ends_at_a_lloyd_fixed_point_checked_in_numpy():
    """Separated clusters: the centroids are the (weighted) means of the rows nearest to
    them, recomputed in float64 NumPy; rows of weight 0 pull no centroid."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[6.0, 0.0], [-6.0, 0.0], [0.0, 6.0], [0.0, -6.0]])
    x = centres[torch.arange(200) % 4] + 0.3 * torch.randn(200, 2, generator=gen)
    outliers = torch.full((10, 2), 50.0)
    data = torch.cat([x, outliers])
    weight = torch.cat([torch.ones(200), torch.zeros(10)])
    torch.manual_seed(1)
    centroids, counts = kmeans_fixed(data, 4, 10, weight=weight)
    c, xs = centroids.double().numpy(), x.double().numpy()
    nearest = ((xs[:, None] - c[None]) ** 2).sum(-1).argmin(-1)
    for k in range(4):
        np.testing.assert_allclose(c[k], xs[nearest == k].mean(0), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == np.bincount(nearest, minlength=4).tolist() == [50] * 4
    assert torch.cdist(centres, centroids).min(1).values.max() < 0.5


def test_deferred_restart_picks_only_rows_of_positive_weight():
    book = Codebook(8, 2, threshold_ema_dead_code=1.0)
    with torch.no_grad():
        book.cluster_size.fill_(0.0)  # every code dead
    rows = torch.cat([torch.full((3, 2), 7.0), torch.arange(10.0).reshape(5, 2)])
    weight = torch.tensor([1.0, 1.0, 1.0, 0, 0, 0, 0, 0])
    torch.manual_seed(0)
    before = book.codebook.clone()
    book.restart_dead_codes(rows, ok=torch.tensor(True), row_weight=weight)
    moved = (book.codebook != before).any(-1)
    assert int(moved.sum()) == 3  # as many codes as rows that may be taken
    assert (book.codebook[moved] == 7.0).all()
    assert book.cluster_size[0][moved].tolist() == [1.0] * 3
    refused = book.codebook.clone()
    book.cluster_size.fill_(0.0)
    book.restart_dead_codes(rows, ok=torch.tensor(False))
    assert torch.equal(book.codebook, refused)


@pytest.mark.slow
def test_inductor_gradients_match_float64_after_the_codebook_update():
    """Inductor may recompute in backward what forward computed from the codes; the EMA update
    overwrites the codes in the same graph, so a recomputed lookup would use the new codes.
    Separate per-head codebooks with the rotation trick once did: the input's gradient against
    an eager float64 run of the same step."""
    torch.manual_seed(0)
    layer = VectorQuantize(dim=16, codebook_size=32, heads=2, separate_codebook_per_head=True)
    reference = copy.deepcopy(layer).double()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    x = batch(0)
    grads = []
    for module, xi in ((compiled, x.clone()), (reference, x.double())):
        xi.requires_grad_()
        with vqvae.input_checks("deferred"):
            out = module(xi)
        (out[0].square().mean() + out[2]).backward()
        grads.append(xi.grad.double())
    assert not torch.equal(layer.codebook, make("heads-separate-ema").codebook)  # updated
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
