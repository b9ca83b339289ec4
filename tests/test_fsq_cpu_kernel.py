"""FSQ's projected call in C (vqvae.quantizers.fsq_cpu): taken where it should be, the same
indices and output as the tensor form bit for bit, and gradients
equal to autograd on the textbook expression in float64, for the tanh, clamp and inward-clamp
bounds, on one thread and on two."""

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


def run(fsq: FSQ, x: torch.Tensor, grad: torch.Tensor | None, c_path: bool, monkeypatch):
    """One call and its backward on ``x``; the gradient of ``out`` is ``grad``, or with None
    that of ``out.sum()`` (one value broadcast to every row)."""
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
    (out.sum() if grad is None else (out * grad).sum()).backward()
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


def close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to float32 sums over many rows: the error allowed grows with the largest
    entry (a weight gradient over 4000 rows of inputs near 8 runs into the hundreds)."""
    torch.testing.assert_close(ours.to(reference.dtype), reference, rtol=1e-4,
                               atol=1e-4 * max(1.0, reference.abs().max().item()))


def check_against_both(fsq: FSQ, x: torch.Tensor, grad: torch.Tensor | None, bound: str,
                       monkeypatch) -> None:
    c = run(fsq, x, grad, True, monkeypatch)
    tensor = run(fsq, x, grad, False, monkeypatch)
    assert c[4], "the C path was not taken"
    assert torch.equal(c[1], tensor[1]) and torch.equal(c[0], tensor[0])
    for ours, theirs in zip([c[2], *c[3]], [tensor[2], *tensor[3]], strict=True):
        close(ours, theirs)
    dense = torch.ones_like(x) if grad is None else grad
    grad_x, grads = textbook(fsq, x, dense, bound)
    for ours, reference in zip([c[2], *c[3]], [grad_x, *grads], strict=True):
        close(ours, reference)


@pytest.mark.parametrize("levels, dim, symmetric, bound", CASES)
def test_c_path_matches_the_tensor_form_and_the_textbook(levels, dim, symmetric, bound,
                                                         monkeypatch):
    torch.manual_seed(dim + len(levels))
    options = OPTIONS[bound]
    fsq = FSQ(levels, dim=dim, preserve_symmetry=symmetric, **options)
    rows = 4 * fsq.codebook_size + 3  # a code table, and rows past its minimum
    x = torch.randn(rows, dim) * 2.0  # many entries past the clamp
    check_against_both(fsq, x, torch.randn(rows, dim), bound, monkeypatch)


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("levels, dim, rows, bound, summed", [
    ([8, 5, 5, 5], 256, 4003, "tanh", False),  # wide, with a table
    ([8, 5, 5, 5], 256, 4003, "tanh", True),  # the gradient of out.sum(): one broadcast row
    ([8, 8, 8, 5, 5], 130, 999, "clamp", False),  # 16000 codes: no table, rows projected
    ([4, 4, 3], 24, 97, "inward", True),  # fewer rows than the table's minimum
    ([7, 5, 5, 5, 5, 5, 5, 5, 5, 5], 40, 1500, "tanh", False),  # 10 channels: no unrolled case
])
def test_c_path_on_wide_features_without_a_table_and_on_two_threads(
        levels, dim, rows, bound, summed, threads, monkeypatch):
    torch.set_num_threads(threads)
    torch.manual_seed(rows)
    fsq = FSQ(levels, dim=dim, **OPTIONS[bound])
    x = torch.randn(rows, dim) * 2.0
    check_against_both(fsq, x, None if summed else torch.randn(rows, dim), bound, monkeypatch)


def test_two_threads_give_the_one_thread_gradients_up_to_rounding(monkeypatch):
    """Each thread sums its own rows; the sums are added in thread order."""
    torch.manual_seed(0)
    fsq = FSQ([8, 5, 5, 5], dim=64)
    x, grad = torch.randn(6000, 64), torch.randn(6000, 64)
    one = run(fsq, x, grad, True, monkeypatch)
    torch.set_num_threads(2)
    two = run(fsq, x, grad, True, monkeypatch)
    again = run(fsq, x, grad, True, monkeypatch)
    assert torch.equal(one[0], two[0]) and torch.equal(one[2], two[2])  # row by row: exact
    for a, b, c in zip(one[3], two[3], again[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        assert torch.equal(b, c)  # the same bits for the same thread count


def test_calls_without_biases_and_non_finite_values_take_the_tensor_form(monkeypatch):
    called = []
    original = cpu_kernel.fsq_forward
    monkeypatch.setattr(cpu_kernel, "fsq_forward",
                        lambda *a, **k: called.append(1) or original(*a, **k))
    FSQ([8, 8, 8], dim=16, projection_has_bias=False)(torch.randn(4096, 16))  # no biases
    FSQ([8, 8, 8], dim=16, num_codebooks=2)(torch.randn(4096, 16))  # two codebooks
    assert not called
    FSQ([8, 8, 8], dim=16, inward_clamp=True)(torch.randn(100, 16))  # no code table: taken
    assert len(called) == 1
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4096, 16)
        x[7, 3] = bad
        with pytest.raises(ValueError, match="(?i)nan|inf|finite"):
            FSQ([8, 8, 8], dim=16)(x)
    assert len(called) == 3  # tried, found the value, handed over


def test_large_calls_on_several_threads_need_the_parallel_build(monkeypatch):
    fsq = FSQ([8, 8, 8], dim=16)
    pin, pout = fsq.project_in, fsq.project_out
    big = torch.randn(fsq_cpu.MAX_PARALLEL_WORK // 16 + 1, 16)
    assert fsq_cpu.usable(big, pin, pout, 1)  # one thread: any size
    torch.set_num_threads(2)
    assert fsq_cpu.usable(big, pin, pout, 1) == cpu_kernel.parallel()
    monkeypatch.setattr(cpu_kernel, "parallel", lambda: False)  # kernels on one thread
    assert fsq_cpu.usable(big[:-1], pin, pout, 1)
    assert not fsq_cpu.usable(big, pin, pout, 1)
