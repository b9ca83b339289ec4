"""LFQ(centre_init=True): project_in's bias centres the projected features on the first
training batch. Checked against NumPy means, once only, masks, checkpoints, bad input and a
compiled call."""

import numpy as np
import pytest
import torch

from vqvae.quantizers.lfq import LFQ


def make(**options):
    torch.manual_seed(0)
    return LFQ(dim=16, codebook_size=512, spherical=True, centre_init=True, **options)


def projected(q, x):
    w = q.project_in.weight.detach().double().numpy()
    b = q.project_in.bias.detach().double().numpy()
    return x.double().numpy().reshape(-1, x.shape[-1]) @ w.T + b


def test_first_training_call_centres_every_feature_and_only_once():
    q = make().train()
    x = torch.randn(4, 50, 16) * 0.3 + torch.linspace(-1, 1, 16)  # features far from centred
    before = projected(q, x)
    assert np.abs(before.mean(0)).max() > 0.05  # a real offset to remove
    q(x)
    after = projected(q, x)
    np.testing.assert_allclose(after, before - before.mean(0), atol=1e-5)
    np.testing.assert_allclose(after.mean(0), 0, atol=1e-5)
    assert bool(q.initted)
    bias = q.project_in.bias.detach().clone()
    q(torch.randn(4, 50, 16) + 3)  # later batches leave the bias to the optimiser
    assert torch.equal(q.project_in.bias.detach(), bias)


def test_the_first_call_sees_its_own_centred_features():
    """Indices of the first call come from the centred features: the signs of
    before - mean, computed in NumPy, most significant bit first."""
    q = make().train()
    x = torch.randn(2, 40, 16) + 0.5
    h = projected(q, x)
    h = h - h.mean(0)
    bits = (h > 0).astype(np.int64)
    expected = (bits * (2 ** np.arange(8, -1, -1))).sum(-1)
    _, indices, _ = q(x)
    np.testing.assert_array_equal(indices.reshape(-1).numpy(), expected)


def test_eval_calls_do_not_centre():
    q = make().eval()
    bias = q.project_in.bias.detach().clone()
    q(torch.randn(2, 30, 16) + 2)
    assert torch.equal(q.project_in.bias.detach(), bias) and not bool(q.initted)


def test_mask_keeps_out_the_masked_tokens():
    q = make().train()
    x = torch.randn(2, 30, 16)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[:, 20:] = False
    x[:, 20:] += 50  # masked tokens would dominate the mean
    kept = projected(q, x[:, :20])
    q(x, mask=mask)
    np.testing.assert_allclose(projected(q, x[:, :20]).mean(0), 0, atol=1e-5)
    assert np.abs(kept.mean(0)).max() < 5  # sanity: the kept tokens were not near the masked


def test_nonfinite_first_batch_changes_nothing():
    q = make().train()
    bias = q.project_in.bias.detach().clone()
    x = torch.randn(2, 30, 16)
    x[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite|NaN"):
        q(x)
    assert torch.equal(q.project_in.bias.detach(), bias) and not bool(q.initted)


def test_checkpoints_with_and_without_the_flag():
    q = make().train()
    q(torch.randn(2, 30, 16) + 1)
    fresh = make()
    fresh.load_state_dict(q.state_dict())
    assert bool(fresh.initted)  # a resumed run does not centre again
    torch.manual_seed(0)
    plain = LFQ(dim=16, codebook_size=512, spherical=True)
    fresh = make()
    fresh.load_state_dict(plain.state_dict())  # weights someone chose: keep them
    assert bool(fresh.initted)
    plain.load_state_dict(q.state_dict())  # the flag is dropped without the option
    assert "initted" not in plain.state_dict()


def test_bad_options():
    with pytest.raises(ValueError, match="centre_init must be True or False"):
        LFQ(dim=16, codebook_size=512, centre_init=1)
    with pytest.raises(ValueError, match="needs a projection with a bias"):
        LFQ(dim=9, codebook_size=512, centre_init=True)
    with pytest.raises(ValueError, match="needs a projection with a bias"):
        LFQ(dim=16, codebook_size=512, centre_init=True, projection_has_bias=False)


@pytest.mark.slow
def test_compiled_first_call_centres_as_the_eager_one():
    x = torch.randn(2, 30, 16) + 0.7
    eager, compiled_module = make().train(), make().train()
    out = eager(x)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(compiled_module.project_in.bias, eager.project_in.bias)
    assert bool(compiled_module.initted)
    assert torch.equal(got[1], out[1])
    y = torch.randn(2, 30, 16)  # the second call leaves the bias alone, compiled too
    bias = compiled_module.project_in.bias.detach().clone()
    compiled(y)
    assert torch.equal(compiled_module.project_in.bias.detach(), bias)
