"""FSQ(inward_clamp=True): the clamp bound whose gradient outside [-1, 1] is kept where it points
back into the range. Forward against the clamp bound, gradients against a NumPy computation of
the rule from the textbook expression, and the two behaviours the rule exists for."""

import numpy as np
import pytest
import torch

from vqvae.quantizers.fsq import FSQ
from vqvae.quantizers.residual_fsq import ResidualFSQ


def numpy_fsq(z, levels, symmetric):
    """Codes and d code / d u (inside the clamp) of the clamp-bounded FSQ, from the papers."""
    lv = np.asarray(levels, dtype=np.float64)
    if symmetric:  # Mentzer et al. with the symmetric grid: L values evenly over [-1, 1]
        u = z
        t = np.clip(u, -1, 1)
        level = np.floor((t + 1) * (lv - 1) / 2 + 0.5)
        return u, level * 2 / (lv - 1) - 1, np.ones_like(lv)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = (lv % 2 == 0) * 0.5
    half_width = np.floor(lv / 2)
    u = z + offset / half_l
    bounded = np.clip(u, -1, 1) * half_l - offset
    return u, np.round(bounded) / half_width, half_l / half_width


def inward_grad(u, grad_code, slope):
    g = grad_code * slope
    keep = (np.abs(u) <= 1) | (u * g > 0)
    return np.where(keep, g, 0.0)


@pytest.mark.parametrize("levels,symmetric", [([8, 5, 5, 5], False), ([7, 6, 4], True),
                                              ([3, 8], False)])
def test_codes_and_gradient_without_projections(levels, symmetric):
    torch.manual_seed(0)
    z = (torch.randn(3, 200, len(levels), dtype=torch.float64) * 1.5).requires_grad_()
    weight = torch.randn(3, 200, len(levels), dtype=torch.float64)
    q = FSQ(levels=levels, inward_clamp=True, preserve_symmetry=symmetric).double()
    out, indices = q(z)
    (out * weight).sum().backward()
    u, codes, slope = numpy_fsq(z.detach().numpy(), levels, symmetric)
    np.testing.assert_allclose(out.detach().numpy(), codes, rtol=0, atol=1e-12)
    expected = inward_grad(u, weight.numpy(), slope)
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-12, atol=1e-12)
    # the rule matters here: some entries outside the range keep a gradient, some lose it
    outside = np.abs(u) > 1
    assert (expected[outside] != 0).any() and (expected[outside] == 0).any()


def test_forward_is_the_clamp_bound_and_gradients_differ_only_outside():
    torch.manual_seed(1)
    for options in ({}, {"preserve_symmetry": True}):
        ours = FSQ(levels=[8, 6, 5], dim=24, inward_clamp=True, **options)
        clamp = FSQ(levels=[8, 6, 5], dim=24, bound_hard_clamp=True, **options)
        clamp.load_state_dict(ours.state_dict())
        x = torch.randn(2, 300, 24) * 4
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(v) for m, v in zip((ours, clamp), xs, strict=True)]
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        target = torch.randn_like(x)
        for out in outs:
            ((out[0] - target) ** 2).sum().backward()
        assert not torch.allclose(xs[0].grad, xs[1].grad)  # saturated entries now get gradient


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [64, 5000])  # below and above the code-table threshold
def test_projected_call_gradients_against_numpy(bias, rows):
    torch.manual_seed(2)
    levels = [8, 5, 5]
    q = FSQ(levels=levels, dim=12, inward_clamp=True, projection_has_bias=bias).double()
    with torch.no_grad():
        q.project_in.weight.mul_(6)  # many entries past the clamp
    x = torch.randn(1, rows, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, rows, 12, dtype=torch.float64)
    out, _ = q(x)
    (out * weight).sum().backward()
    w_in = q.project_in.weight.detach().numpy()
    b_in = q.project_in.bias.detach().numpy() if bias else 0.0
    w_out = q.project_out.weight.detach().numpy()
    b_out = q.project_out.bias.detach().numpy() if bias else 0.0
    xn, wn = x.detach().numpy()[0], weight.numpy()[0]
    h = xn @ w_in.T + b_in
    u, codes, slope = numpy_fsq(h, levels, False)
    np.testing.assert_allclose(out.detach().numpy()[0], codes @ w_out.T + b_out, atol=1e-10)
    grad_h = inward_grad(u, wn @ w_out, slope)
    np.testing.assert_allclose(x.grad.numpy()[0], grad_h @ w_in, atol=1e-10)
    np.testing.assert_allclose(q.project_in.weight.grad.numpy(), grad_h.T @ xn, atol=1e-9)
    np.testing.assert_allclose(q.project_out.weight.grad.numpy(), wn.T @ codes, atol=1e-9)
    assert (np.abs(u) > 1).mean() > 0.2


def test_a_saturated_entry_comes_back_and_never_runs_away():
    """One scalar past the top of the range. A loss that wants a lower code: torch's clamp gives
    no gradient (stuck for ever), the inward clamp moves it back. A loss that wants a higher
    code than the top one: no gradient, so it does not drift outwards."""
    for wants_lower in (True, False):
        for inward in (True, False):
            q = FSQ(levels=[5], inward_clamp=inward, bound_hard_clamp=True)
            z = torch.full((1, 1, 1), 3.0, requires_grad=True)
            opt = torch.optim.SGD([z], lr=0.5)
            for _ in range(20):
                opt.zero_grad()
                out, _ = q(z)
                loss = (out - (-1.0 if wants_lower else 2.0)) ** 2
                loss.sum().backward()
                opt.step()
            if wants_lower and inward:
                assert z.item() < 1.0 and out.item() < 1.0
            else:
                assert z.item() == 3.0


def test_autocast_call_runs_in_float32_and_returns_the_autocast_dtype():
    torch.manual_seed(3)
    q = FSQ(levels=[8, 8, 8], dim=16, inward_clamp=True)
    x = torch.randn(1, 700, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, indices = q(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # float32 projections of the bfloat16 input: the float32 call's indices exactly
    reference, ref_indices = q(x.bfloat16().float())
    assert torch.equal(indices, ref_indices)
    assert torch.equal(out, reference.bfloat16())


def test_bad_values_and_the_residual_stack_refuse():
    with pytest.raises(ValueError, match="inward_clamp must be True or False"):
        FSQ(levels=[8, 8], inward_clamp="yes")
    with pytest.raises(ValueError, match="inward_clamp is an option of FSQ alone"):
        ResidualFSQ(levels=[8, 8], num_quantizers=2, inward_clamp=True)


def test_nonfinite_input_is_refused():
    q = FSQ(levels=[8, 8, 8], dim=16, inward_clamp=True)
    x = torch.randn(1, 10, 16)
    x[0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        q(x)
