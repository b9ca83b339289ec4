"""What the compile tests share: the backend they trace with, how many steps they take, how
close compiled and eager numbers must be, and the runs that put an eager module and its compiled
copy through the same calls."""

import copy
import os
from collections.abc import Callable

import torch

from vqvae.quantizers.guard import input_checks

# aot_eager: the graph capture and autograd tracing that decide whether a module compiles at
# all, with eager kernels (and eager random draws); VQVAE_COMPILE_BACKEND=inductor runs the same
# tests through code generation
BACKEND = os.environ.get("VQVAE_COMPILE_BACKEND", "aot_eager")
STEPS = 3
# inductor fuses and reorders float reductions: sums agree to a few float32 ulps, not bit for bit
CLOSE = dict(rtol=1e-4, atol=1e-5)


def batch(seed: int, shape=(4, 12, 16)) -> torch.Tensor:
    """A reproducible normal batch: the same ``seed`` gives the same numbers."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def plain_call(module, x):
    return module(x)


def assert_training_equals_eager(make: Callable[[], torch.nn.Module],
                                 batch_of: Callable[[int], torch.Tensor],
                                 objective, assert_same, *, call=plain_call,
                                 checks: str = "auto") -> None:
    """``STEPS`` SGD steps of an eager module from ``make()`` and of its compiled copy, each call
    on ``batch_of(step)`` under ``checks`` input checks and with the same seed before it:
    ``assert_same`` holds between their outputs, and their input gradients (where
    ``objective(output)`` gives a loss to backpropagate, not None) and final states agree."""
    torch.manual_seed(0)
    eager = make().train()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=BACKEND)
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1) if list(m.parameters()) else None
                  for m in (eager, compiled_module)]
    for step in range(STEPS):
        x = batch_of(step)
        outs = []
        for module, optimiser in zip((eager, compiled), optimisers, strict=True):
            torch.manual_seed(100 + step)  # both runs draw the same random numbers
            xi = x.clone().requires_grad_()
            with input_checks(checks):
                out = call(module, xi)
            loss = objective(out)
            if loss is not None:
                loss.backward()
            outs.append((out, xi.grad))
            if optimiser is not None:
                optimiser.step()
                optimiser.zero_grad()
        assert_same(outs[0][0], outs[1][0])
        if outs[0][1] is not None or outs[1][1] is not None:
            torch.testing.assert_close(outs[0][1], outs[1][1], **CLOSE)
    for (key, a), (_, b) in zip(eager.state_dict().items(), compiled_module.state_dict().items(),
                                strict=True):
        torch.testing.assert_close(a, b, **CLOSE, msg=key)


def assert_eval_equals_eager(make: Callable[[], torch.nn.Module],
                             batch_of: Callable[[int], torch.Tensor], assert_same, *,
                             call=plain_call) -> None:
    """Two eval calls of a module from ``make()`` and of its compiled copy, on ``batch_of(10)``
    and ``batch_of(11)`` with the same seed before each: ``assert_same`` holds between them."""
    torch.manual_seed(0)
    eager = make().eval()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, backend=BACKEND)
    with torch.no_grad():
        for seed in range(2):
            x = batch_of(10 + seed)
            torch.manual_seed(seed)
            expected = call(eager, x)
            torch.manual_seed(seed)
            got = call(compiled, x)
            assert_same(expected, got)


def run_deferred_pair(eager, compiled, steps: int = STEPS, *, train: bool = True,
                      kwargs_of: Callable[[int], dict] = lambda step: {}) -> list:
    """Call ``eager`` (under deferred input checks) and ``compiled`` alike ``steps`` times on
    ``batch(step)`` with ``kwargs_of(step)``, the same seed before each call; in training
    ``mean(quantized²) + sum(losses)`` is backpropagated. Returns each step's pair of
    ``((quantized, indices, loss), input grad, parameter grads)``, what :func:`assert_same_run`
    compares."""
    outputs = []
    for step in range(steps):
        x = batch(step)
        kwargs = kwargs_of(step)
        pair = []
        for module in (eager, compiled):
            xi = x.clone().requires_grad_(train)
            torch.manual_seed(100 + step)
            with input_checks("deferred"):
                out = module(xi, **kwargs)
            if train:
                (out[0].square().mean() + out[2].sum()).backward()
            grads = {k.removeprefix("_orig_mod."): p.grad.clone()
                     for k, p in module.named_parameters() if p.grad is not None}
            pair.append((out, xi.grad, grads))
            for p in module.parameters():
                p.grad = None
        outputs.append(pair)
    return outputs


def assert_same_run(eager, compiled_module, outputs) -> None:
    """Each step's ``((quantized, indices, loss), input grad, parameter grads)`` pair agrees
    (indices exactly), and so do the two modules' buffers at the end."""
    for (a, grad_a, grads_a), (b, grad_b, grads_b) in outputs:
        assert torch.equal(a[1], b[1])  # the same codes
        torch.testing.assert_close(a[0], b[0], **CLOSE)
        torch.testing.assert_close(a[2], b[2], **CLOSE)
        if grad_a is not None:
            torch.testing.assert_close(grad_a, grad_b, **CLOSE)
        assert grads_a.keys() == grads_b.keys()
        for key in grads_a:
            torch.testing.assert_close(grads_a[key], grads_b[key], **CLOSE, msg=key)
    buffers_a, buffers_b = dict(eager.named_buffers()), dict(compiled_module.named_buffers())
    assert buffers_a.keys() == buffers_b.keys()
    for key in buffers_a:
        torch.testing.assert_close(buffers_a[key], buffers_b[key], **CLOSE, msg=key)


def assert_deferred_equals_immediate(make: Callable[[], torch.nn.Module]) -> None:
    """Deferred calls run the same arithmetic as immediate ones when nothing is drawn at
    random: three training calls give the same codes, output, losses and state."""
    immediate, deferred = make().train(), make().train()
    for step in range(3):
        x = batch(step)
        with input_checks("immediate"):
            a = immediate(x)
        with input_checks("deferred"):
            b = deferred(x)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[2], b[2])
    for key, value in immediate.state_dict().items():
        torch.testing.assert_close(value, deferred.state_dict()[key], msg=key)
