"""torch.compile(fullgraph=True) of ResidualVQ and GroupedResidualVQ: compiled training calls
(forward and backward; EMA, learnable and shared codebooks, k-means, restarts, quantize dropout,
stochastic sampling, beam search) leave the module in the state eager calls with deferred input
checks leave it in, give the same codes, outputs, losses and gradients; eval calls change
nothing. Quantize dropout decided on the device is checked against its definition.

Backend ``aot_eager`` by default (random draws match eager ones); ``VQVAE_COMPILE_BACKEND=
inductor`` runs the cases without random draws through code generation.
"""

import copy

import pytest
import torch
from compile_support import (
    BACKEND,
    STEPS,
    assert_deferred_equals_immediate,
    assert_same_run,
    batch,
    run_deferred_pair,
)

import vqvae
from vqvae.quantizers import cpu_kernel
from vqvae.quantizers.checks import QuantizerInputError
from vqvae.quantizers.residual import DROPPED, GroupedResidualVQ, ResidualVQ

CONFIGS = {
    "ema": dict(),
    "kmeans-dead": dict(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1.0),
    "dropout": dict(quantize_dropout=True),
    "dropout-multiple": dict(quantize_dropout=True, quantize_dropout_multiple_of=2,
                             quantize_dropout_cutoff_index=1, threshold_ema_dead_code=1.0),
    "rq-vae": dict(shared_codebook=True, stochastic_sample_codes=True,
                   sample_codebook_temp=0.5),
    "shared-dropout-dead": dict(shared_codebook=True, quantize_dropout=True,
                                threshold_ema_dead_code=1.0),
    "rotation-projection": dict(rotation_trick=True, codebook_dim=8),
    "learnable": dict(decay=None),
    "cosine": dict(use_cosine_sim=True, kmeans_init=True, kmeans_iters=2),
    "beam": dict(beam_size=2),
    "layer-forward": dict(orthogonal_reg_weight=0.1),
    "grad-frac": dict(quant_grad_frac=0.5),
    "implicit": dict(implicit_neural_codebook=True),
    "grouped": dict(groups=2),
    "grouped-dropout-kmeans": dict(groups=2, quantize_dropout=True, kmeans_init=True,
                                   kmeans_iters=2),
}
DETERMINISTIC = ("ema", "rotation-projection", "learnable", "beam", "grad-frac", "grouped")


def make(name: str):
    options = dict(CONFIGS[name])
    torch.manual_seed(0)
    if "groups" in options:
        return GroupedResidualVQ(dim=16, codebook_size=32, num_quantizers=3, **options)
    return ResidualVQ(dim=16, codebook_size=32, num_quantizers=3, **options)


def run_both(name: str, steps: int = STEPS, train: bool = True):
    eager = make(name).train(train)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=BACKEND)
    return eager, compiled_module, run_deferred_pair(eager, compiled, steps, train=train)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_training_equals_eager_deferred(name):
    if BACKEND != "aot_eager" and name not in DETERMINISTIC:
        pytest.skip("random draws of this backend differ from eager ones")
    eager, compiled_module, outputs = run_both(name)
    assert_same_run(eager, compiled_module, outputs)


@pytest.mark.slow
def test_compiled_training_through_torch_operations(monkeypatch):
    """The same with the C kernel switched off: the graph holds torch's search instead."""
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    eager, compiled_module, outputs = run_both("kmeans-dead")
    assert_same_run(eager, compiled_module, outputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ema", "grouped", "beam"])
def test_compiled_eval_equals_eager_and_changes_nothing(name):
    eager, compiled_module, outputs = run_both(name, steps=2, train=False)
    fresh = make(name)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, compiled_module.state_dict()[key]), key
    assert_same_run(eager, compiled_module, outputs)


@pytest.mark.slow
def test_compiled_dropout_drops_trailing_depths_with_minus_one():
    eager, compiled_module, outputs = run_both("dropout", steps=6)
    assert_same_run(eager, compiled_module, outputs)
    kept_counts = set()
    for pair in outputs:
        indices, losses = pair[1][0][1], pair[1][0][2]
        dropped = (indices == DROPPED).all(dim=(0, 1))  # (L,) a depth is dropped everywhere
        assert not (indices == DROPPED).any(-1).any() or dropped.any()
        kept = int((~dropped).sum())
        assert kept >= 1 and not dropped[:kept].any() and dropped[kept:].all()
        assert (losses[kept:] == 0).all()
        kept_counts.add(kept)
    assert len(kept_counts) > 1  # the draw varies between calls


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kmeans-dead", "shared-dropout-dead", "grouped"])
def test_compiled_non_finite_batch_changes_no_buffer_and_raises_at_read_back(name):
    module = make(name).train()
    compiled = torch.compile(module, fullgraph=True, backend=BACKEND)
    compiled(batch(0))
    vqvae.raise_deferred(module)
    before = {k: v.clone() for k, v in module.named_buffers()}
    x = batch(1)
    x[3, 11, 15] = float("inf")  # in the last group of a grouped quantizer
    compiled(x)
    for key, value in module.named_buffers():
        if not key.endswith("nonfinite_calls"):
            assert torch.equal(value, before[key]), key
    with pytest.raises(QuantizerInputError, match="non-finite"):
        vqvae.raise_deferred(module)


@pytest.mark.slow
def test_compiled_mask_is_refused_with_a_clear_error():
    module = make("ema").train()
    mask = torch.ones(4, 12, dtype=torch.bool)
    with pytest.raises(Exception, match="mask is not supported in compiled"):
        torch.compile(module, fullgraph=True, backend=BACKEND)(batch(0), mask=mask)


# ---------------------------------------------------------------------------- deferred eager


@pytest.mark.parametrize("multiple, cutoff", [(1, 0), (2, 1), (3, 0)])
def test_dropout_mask_follows_its_definition(multiple, cutoff):
    """last = cutoff + seed mod (L − cutoff), rounded up to a multiple, kept depths 0..last:
    checked by hand for every seed of a full period."""
    module = ResidualVQ(dim=4, codebook_size=8, num_quantizers=5, quantize_dropout=True,
                        quantize_dropout_multiple_of=multiple,
                        quantize_dropout_cutoff_index=cutoff)
    for seed in range(12):
        mask = module.dropout_mask(torch.tensor(seed))
        last = cutoff + seed % (5 - cutoff)
        last = -(-(last + 1) // multiple) * multiple - 1
        expected = [depth <= last for depth in range(5)]
        assert mask.tolist() == expected, seed


@pytest.mark.parametrize("name", ["ema", "kmeans-dead", "shared-dropout-dead", "learnable",
                                  "grouped", "beam"])
def test_deferred_non_finite_batch_changes_no_buffer_and_raises_at_read_back(name):
    module = make(name).train()
    with vqvae.input_checks("deferred"):
        module(batch(0))
        vqvae.raise_deferred(module)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        x = batch(1)
        x[0, 0, 0] = float("nan")
        out = module(x)
    after = module.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert torch.isnan(out[0][0, 0]).any()  # (the NaN's group, for grouped quantizers)
    with pytest.raises(QuantizerInputError, match="non-finite"):
        vqvae.raise_deferred(module)
    vqvae.raise_deferred(module)  # reported once


def test_deferred_eval_gives_nan_rows_for_non_finite_input():
    module = make("ema").eval()
    x = batch(2)
    x[1, 4, 7] = float("inf")
    with vqvae.input_checks("deferred"):
        out = module(x)
    assert torch.isnan(out[0][1, 4]).all()
    finite = torch.ones(4, 12, dtype=torch.bool)
    finite[1, 4] = False
    assert torch.isfinite(out[0][finite]).all()
    with vqvae.input_checks("immediate"):
        reference = module(torch.where(torch.isfinite(x), x, 0.0))
    assert torch.equal(out[1][finite], reference[1][finite])


def test_deferred_equals_immediate_without_random_draws():
    assert_deferred_equals_immediate(lambda: make("ema"))
