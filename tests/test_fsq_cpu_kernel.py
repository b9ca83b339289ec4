"""FSQ's projected call in C (vqvae.quantizers.fsq_cpu): taken where it should be, the same
output and indices as the tensor form bit for bit, and gradients equal to autograd on the
textbook expression in float64, for the tanh, clamp and inward-clamp bounds."""

from __future__ import annotations

import itertools

import pytest
import torch

from vqvae import FSQ
from vqvae.quantizers import cpu_kernel, fsq_cpu

pytestmark = pytest.mark.skipif(not cpu_kernel.available(),
                                reason=f"no C kernels: {cpu_kernel.unavailable_reason()}")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: where the C call takes calls of every size (see fsq_cpu.usable)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(fsq: FSQ, x: torch.Tensor, grad: torch.Tensor, c_path: bool, monkeypatch):
    calls = []
    if c_path:
        original = cpu_kernel.fsq_forward

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(cpu_kernel, "fsq_forward", counted)
    else:
        monkeypatch.setattr(fsq_cpu, "usable", lambda *args: False)
    fsq.zero_grad()
    x = x.clone().requires_grad_()
    out, indices = fsq(x)
    (out * grad).sum().backward()
    monkeypatch.undo()
    return out.detach(), indices, x.grad, [p.grad.clone() for p in fsq.parameters()], calls


def textbook(fsq: FSQ, x: torch.Tensor, grad: torch.Tensor, bound: str):
    """The call in float64 by plain autograd: project_in, shift, the bound (tanh, or a clamp;
    the inward rule as an identity gradient masked where it would point outwards), round
    (straight through), project_out."""
    w_in, b_in = (p.detach().double().requires_grad_() for p in fsq.project_in.parameters())
    w_out, b_out = (p.detach().double().requires_grad_() for p in fsq.project_out.parameters())
    x64 = x.double().requires_grad_()
    shift, scale, bias, centre, step, slope = (
        getattr(fsq, f"_bound_{n}").double()
        for n in ("shift", "scale", "bias", "centre", "step", "slope"))
    u = x64 @ w_in.t() + b_in + shift
    inward = bound == "inward"
    clamped = torch.tanh(u) if bound == "tanh" else u.clamp(-1, 1)
    if inward:  # identity gradient outside the range (the mask below keeps the inward part)
        clamped = u + (clamped - u).detach()
    if fsq.preserve_symmetry:
        level = torch.floor((clamped.detach() + 1) * scale + 0.5)
        code = clamped * scale * step + (level * step - 1 - clamped * scale * step).detach()
    else:
        level = torch.round(bias + clamped.detach() * scale)
        code = clamped * slope + (level / centre - clamped * slope).detach()
    if inward:  # u's gradient kept inside the range, or where it has u's sign
        held = u.detach()
        u.register_hook(lambda g: g * ((held.abs() <= 1) | (held * g > 0)))
    out = code @ w_out.t() + b_out
    (out * grad.double()).sum().backward()
    return x64.grad, [w_in.grad, b_in.grad, w_out.grad, b_out.grad]


CASES = list(itertools.product(([8, 8, 8], [8, 5, 5, 5], [3, 4, 7]), (16, 37), (False, True),
                               ("tanh", "clamp", "inward")))
OPTIONS = {"tanh": {}, "clamp": {"bound_hard_clamp": True}, "inward": {"inward_clamp": True}}


@pytest.mark.parametrize("levels, dim, symmetric, bound", CASES)
def test_c_path_matches_the_tensor_form_and_the_textbook(levels, dim, symmetric, bound,
                                                         monkeypatch):
    torch.manual_seed(dim + len(levels))
    options = OPTIONS[bound]
    fsq = FSQ(levels, dim=dim, preserve_symmetry=symmetric, **options)
    rows = 4 * fsq.codebook_size + 3  # a code table, and rows past its minimum
    x = torch.randn(rows, dim) * 2.0  # many entries past the clamp
    grad = torch.randn(rows, dim)
    c = run(fsq, x, grad, True, monkeypatch)
    tensor = run(fsq, x, grad, False, monkeypatch)
    assert c[4], "the C path was not taken"
    assert torch.equal(c[0], tensor[0]) and torch.equal(c[1], tensor[1])
    for ours, theirs in zip([c[2], *c[3]], [tensor[2], *tensor[3]], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # float32 sums
    grad_x, grads = textbook(fsq, x, grad, bound)
    for ours, reference in zip([c[2], *c[3]], [grad_x, *grads], strict=True):
        torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-4)


def test_few_rows_and_non_finite_values_take_the_tensor_form(monkeypatch):
    called = []
    original = cpu_kernel.fsq_forward
    monkeypatch.setattr(cpu_kernel, "fsq_forward",
                        lambda *a, **k: called.append(1) or original(*a, **k))
    FSQ([8, 8, 8], dim=16, inward_clamp=True)(torch.randn(100, 16))  # no code table
    FSQ([8, 8, 8], dim=16, projection_has_bias=False)(torch.randn(4096, 16))  # no biases
    assert not called
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4096, 16)
        x[7, 3] = bad
        with pytest.raises(ValueError, match="(?i)nan|inf|finite"):
            FSQ([8, 8, 8], dim=16)(x)
    assert len(called) == 2  # tried, found the value, handed over


def test_wide_features_and_large_calls_on_several_threads_take_the_tensor_form():
    fsq = FSQ([8, 8, 8], dim=16)
    table = fsq._table_for(8192, torch.float32, torch.device("cpu"))
    pin, pout = fsq.project_in, fsq.project_out
    assert fsq_cpu.usable(torch.randn(8192, 16), pin, pout, table)  # one thread: any size
    wide = FSQ([8, 8, 8], dim=fsq_cpu.MAX_DIM + 1)
    assert not fsq_cpu.usable(torch.randn(8192, fsq_cpu.MAX_DIM + 1), wide.project_in,
                              wide.project_out, table)
    torch.set_num_threads(2)
    rows = fsq_cpu.MAX_PARALLEL_WORK // 16
    assert fsq_cpu.usable(torch.randn(rows, 16), pin, pout, table)
    assert not fsq_cpu.usable(torch.randn(rows + 1, 16), pin, pout, table)
