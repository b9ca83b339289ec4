"""What the compile tests share: the backend they trace with, how many steps they take, how
close compiled and eager numbers must be, and the comparison of two runs."""

import os

import torch

# aot_eager: the graph capture and autograd tracing that decide whether a module compiles at
# all, with eager kernels (and eager random draws); VQVAE_COMPILE_BACKEND=inductor runs the same
# tests through code generation
BACKEND = os.environ.get("VQVAE_COMPILE_BACKEND", "aot_eager")
STEPS = 3
# inductor fuses and reorders float reductions: sums agree to a few float32 ulps, not bit for bit
CLOSE = dict(rtol=1e-4, atol=1e-5)


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
