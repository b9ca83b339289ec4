"""The C kernels as torch.library custom ops: schemas, fake implementations, tracing, compile."""

import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from vqvae.quantizers import cpu_kernel

pytestmark = pytest.mark.skipif(
    not cpu_kernel.available(), reason=f"C kernels not built: {cpu_kernel.unavailable_reason()}")


def _ema_float64(codebook, cluster_size, counts, sums, decay, eps, threshold):
    """The EMA step with Laplace smoothing, written out in float64 from its definition."""
    codebook, cluster_size = codebook.double(), cluster_size.double()
    counts, sums = counts.double(), sums.double()
    size = codebook.shape[0]

    def smoothed(s):
        return (s + eps) / (s.sum() + size * eps) * s.sum()

    embed_sum = codebook * smoothed(cluster_size)[:, None]
    embed_sum = decay * embed_sum + (1 - decay) * sums
    cluster_size = decay * cluster_size + (1 - decay) * counts
    return embed_sum / smoothed(cluster_size)[:, None], cluster_size, \
        int((cluster_size < threshold).sum())


def _ema_inputs(seed=0, size=40, dim=6):
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(size, dim, generator=generator)
    cluster_size = torch.rand(size, generator=generator) * 3
    counts = torch.randint(0, 5, (size,), generator=generator).float()
    sums = torch.randn(size, dim, generator=generator) * counts[:, None]
    return codebook, cluster_size, counts, sums


def test_search_op_matches_float64_cdist_and_passes_opcheck():
    torch.manual_seed(0)
    for num_rows, dim, num_codes in [(37, 16, 512), (5, 3, 7), (0, 8, 9)]:
        x, codebook = torch.randn(num_rows, dim), torch.randn(num_codes, dim)
        got = torch.ops.vqvae.nearest_code_cpu(x, codebook)
        assert got.dtype == torch.long and got.shape == (num_rows,)
        if num_rows:
            assert torch.equal(got, torch.cdist(x.double(), codebook.double()).argmin(-1))
        torch.library.opcheck(torch.ops.vqvae.nearest_code_cpu, (x, codebook))


def test_statistics_op_matches_bincount_and_passes_opcheck():
    torch.manual_seed(0)
    h, indices = torch.randn(300, 5), torch.randint(0, 20, (300,))
    counts, sums = torch.ops.vqvae.code_statistics_cpu(h, indices, 20)
    assert torch.equal(counts, torch.bincount(indices, minlength=20).float())
    expected = torch.zeros(20, 5, dtype=torch.float64).index_add_(0, indices, h.double())
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.vqvae.code_statistics_cpu, (h, indices, 20))


def test_update_op_matches_the_formula_in_float64_and_passes_opcheck():
    codebook, cluster_size, counts, sums = _ema_inputs()
    expected_codebook, expected_size, expected_dead = _ema_float64(
        codebook, cluster_size, counts, sums, 0.8, 1e-3, 1.0)
    dead = torch.ops.vqvae.ema_update_cpu(codebook, cluster_size, counts, sums, 0.8, 1e-3, 1.0)
    assert dead.shape == () and dead.dtype == torch.long
    assert int(dead) == expected_dead and 0 < expected_dead < 40
    torch.testing.assert_close(codebook.double(), expected_codebook, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cluster_size.double(), expected_size, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.vqvae.ema_update_cpu,
                          (*_ema_inputs(1), 0.8, 1e-3, 1.0))


def test_fake_implementations_give_shapes_and_refuse_bad_input():
    with FakeTensorMode():
        x, codebook = torch.empty(11, 16), torch.empty(30, 16)
        indices = torch.ops.vqvae.nearest_code_cpu(x, codebook)
        assert indices.shape == (11,) and indices.dtype == torch.long
        counts, sums = torch.ops.vqvae.code_statistics_cpu(x, indices, 30)
        assert counts.shape == (30,) and sums.shape == (30, 16) and sums.dtype == torch.float32
        dead = torch.ops.vqvae.ema_update_cpu(codebook, counts, counts, sums, 0.9, 1e-5, 0.0)
        assert dead.shape == () and dead.dtype == torch.long
        with pytest.raises(ValueError, match="at most 32 columns"):
            torch.ops.vqvae.nearest_code_cpu(torch.empty(4, 64), torch.empty(5, 64))
        with pytest.raises(ValueError, match="int64 indices"):
            torch.ops.vqvae.code_statistics_cpu(x, indices.int(), 30)
        with pytest.raises(ValueError, match="sums"):
            torch.ops.vqvae.ema_update_cpu(codebook, counts, counts, sums[:, :3].clone(), 0.9, 1e-5,
                                           0.0)


def test_public_functions_are_recorded_as_ops_when_traced():
    def step(x, codebook):
        indices = cpu_kernel.nearest_code(x, codebook)
        return cpu_kernel.code_statistics(x, indices, codebook.shape[0])

    graph = make_fx(step)(torch.randn(20, 4), torch.randn(9, 4))
    targets = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    assert torch.ops.vqvae.nearest_code_cpu.default in targets
    assert torch.ops.vqvae.code_statistics_cpu.default in targets


@pytest.mark.slow
def test_compiled_step_matches_eager():
    # one EMA training step's codebook work, compiled whole: no graph break around the C calls
    def step(x, codebook, cluster_size):
        # the checks the layers make are constants to the compiler, not graph breaks
        assert cpu_kernel.available() and cpu_kernel.supports(x, codebook)
        assert cpu_kernel.supports_ema(x, codebook, cluster_size)
        indices = cpu_kernel.nearest_code(x, codebook)
        counts, sums = cpu_kernel.code_statistics(x, indices, codebook.shape[0])
        dead = torch.ops.vqvae.ema_update_cpu(codebook, cluster_size, counts, sums, 0.9, 1e-5,
                                              0.5)
        return indices, dead

    torch.manual_seed(0)
    x, codebook, cluster_size = torch.randn(256, 16), torch.randn(64, 16), torch.rand(64)
    eager_state = (codebook.clone(), cluster_size.clone())
    compiled_state = (codebook.clone(), cluster_size.clone())
    eager = step(x, *eager_state)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(x, *compiled_state)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    assert torch.equal(compiled_state[0], eager_state[0])  # the in-place update happened
    assert torch.equal(compiled_state[1], eager_state[1])
    assert not torch.equal(compiled_state[0], codebook)


def test_the_constant_mark_is_dynamos_own():
    """cpu_kernel marks its build queries constant to torch.compile without importing
    torch._dynamo (a second of every import): the mark must be what Dynamo's decorator sets."""
    import torch._dynamo

    def ours():
        return 0

    def dynamos():
        return 0

    assert cpu_kernel.constant_to_compile(ours) is ours
    assert torch._dynamo.assume_constant_result(dynamos) is dynamos
    assert vars(ours) == vars(dynamos) and vars(ours)
    for query in (cpu_kernel.available, cpu_kernel.simd_lanes, cpu_kernel.unavailable_reason):
        assert vars(query).items() >= vars(dynamos).items()


@pytest.mark.slow
def test_import_leaves_dynamo_unloaded():
    code = "import sys, vqvae; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
