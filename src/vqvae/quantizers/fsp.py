"""FSP, finite scalar perturbation (VP-VAE): a drop-in for the library's ``FSP``.

Each latent channel is mapped to [0, 1] by a CDF activation (tanh, sigmoid, normal, laplace,
cauchy), then to the centre of one of ``levels[i]`` equal bins; in training a fraction
``1 - quantize_rate`` of the entries is instead perturbed by uniform noise up to half a bin.
A moment-matching ``VectorNorm`` loss keeps the latents near a target distribution.

Call as in ``vector_quantize_pytorch`` 1.32:
``quantized, indices, norm_loss, info = fsp(z)``. Where we differ on purpose:

- The bin and index arithmetic runs in float32 for float16/bfloat16 inputs, and indices are
  ``int64`` sums of integer levels. The library sums ``level * basis`` in the input's dtype and
  truncates, so a bfloat16 input gets wrong indices for codebooks past 256 codes.
- Non-finite input raises :class:`QuantizerInputError`.
- ``info["norm_info"]`` reports the batch statistics without autograd history (the loss is
  differentiable; the statistics come out of the fused call). The variance is computed in two
  passes, mean then squared deviations, so it can differ from ``torch.var_mean`` in the last
  bits.

The forward is one autograd node (``_FSPCall``) with a closed-form backward: the call is
dominated by per-operation overhead at the README's sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .fsq import check_finite, check_tensor
from .narrow_linear import narrow_linear, narrow_outer
from .tracing import tracing

_SQRT2 = math.sqrt(2.0)
_UNIT_UNIFORM_STD = math.sqrt(1.0 / 12.0)  # maps bin centres in [0, 1] to unit variance

_CDFS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "tanh": (lambda z: (torch.tanh(z) + 1.0) / 2.0, lambda p: torch.atanh(p * 2.0 - 1.0)),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (lambda z: (1.0 + torch.erf(z / _SQRT2)) / 2.0,
               lambda p: torch.erfinv(2.0 * p - 1.0) * _SQRT2),
    "laplace": (lambda z: 0.5 * (1.0 + torch.sign(z) * (1.0 - torch.exp(-z.abs()))),
                lambda p: -torch.sign(p - 0.5) * torch.log(1.0 - 2.0 * (p - 0.5).abs())),
    "cauchy": (lambda z: torch.arctan(z) / math.pi + 0.5,
               lambda p: torch.tan((p - 0.5) * math.pi)),
}

# (mean, variance, skewness, kurtosis) targets and weights of each preset
_NORM_PRESETS = {
    "none": ((0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)),
    "var": ((0.0, 1.0, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
    "kurt": ((0.0, 1.0, 0.0, 0.0), (0.1, 0.07, 0.06, 0.05)),
    "var_tanh": ((0.0, 0.8225, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
    "var_sigmoid": ((0.0, 3.29, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
    "var_laplace": ((0.0, 2.0, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
}


def build_cdf_act(act_name: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    if act_name not in _CDFS:
        raise ValueError(f"unknown CDF activation {act_name!r}; choose one of {list(_CDFS)}")
    return _CDFS[act_name]


class VectorNorm(nn.Module):
    """Squared distance of the per-channel batch mean, variance, skewness and excess kurtosis
    from their targets, weighted."""

    def __init__(self, l1_target: float = 0.0, l1_weight: float = 0.1, l2_target: float = 1.0,
                 l2_weight: float = 0.07, l3_target: float = 0.0, l3_weight: float = 0.06,
                 l4_target: float = 0.0, l4_weight: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.l1_target, self.l1_weight = l1_target, l1_weight
        self.l2_target, self.l2_weight = l2_target, l2_weight
        self.l3_target, self.l3_weight = l3_target, l3_weight
        self.l4_target, self.l4_weight = l4_target, l4_weight
        self.eps = eps
        weights = (l1_weight, l2_weight, l3_weight, l4_weight)
        self.active = any(weights)  # the loss depends on the input
        self.higher = bool(l3_weight or l4_weight)  # skewness or kurtosis weighted
        self._constants: dict = {}

    def constants(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Targets (4, 1) and weights / channels (4, 1) in ``z``'s dtype and device, made once
        (``FSP``'s fused call weights the squared distances with them)."""
        key = (z.dtype, z.device, z.shape[-1])
        if key not in self._constants:
            targets = torch.tensor([self.l1_target, self.l2_target, self.l3_target,
                                    self.l4_target], dtype=z.dtype, device=z.device)
            weights = torch.tensor([self.l1_weight, self.l2_weight, self.l3_weight,
                                    self.l4_weight], dtype=z.dtype, device=z.device)
            made = (targets[:, None], weights[:, None] / z.shape[-1])
            if tracing():  # a graph must not store its tensors on the module
                return made
            self._constants[key] = made
        return self._constants[key]

    @classmethod
    def build(cls, name: str) -> VectorNorm:
        if name not in _NORM_PRESETS:
            raise ValueError(f"unknown vector_norm preset {name!r}; choose one of "
                             f"{list(_NORM_PRESETS)}")
        (t1, t2, t3, t4), (w1, w2, w3, w4) = _NORM_PRESETS[name]
        return cls(t1, w1, t2, w2, t3, w3, t4, w4)

    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        variance, mean = torch.var_mean(z, dim=0, unbiased=True)
        std = variance.sqrt().clamp_min(self.eps)
        standard = (z - mean) / std
        skewness = standard.pow(3).mean(0)
        kurtosis = standard.pow(4).mean(0) - 3.0
        loss = (((mean - self.l1_target) ** 2).mean() * self.l1_weight
                + ((variance - self.l2_target) ** 2).mean() * self.l2_weight
                + ((skewness - self.l3_target) ** 2).mean() * self.l3_weight
                + ((kurtosis - self.l4_target) ** 2).mean() * self.l4_weight)
        return loss, {"mean": mean, "variance": variance, "skewness": skewness,
                      "kurtosis": kurtosis}


def _cdf_slope(act_name: str, h: Tensor, act: Tensor, scale: float) -> Tensor:
    """``scale`` times the derivative of the CDF activation at ``h`` (``act`` is its value), as
    autograd takes it of the forms in ``_CDFS`` (the Laplace form's sign makes it 0 at 0)."""
    if act_name == "tanh":
        return (1.0 - act).mul_(act).mul_(2.0 * scale)  # (1 - tanh^2) / 2, tanh = 2 act - 1
    if act_name == "sigmoid":
        return (1.0 - act).mul_(act).mul_(scale)
    if act_name == "normal":
        return h.square().mul_(-0.5).exp_().mul_(scale / math.sqrt(2.0 * math.pi))
    if act_name == "laplace":
        return h.abs().neg_().exp_().mul_(h.sign().abs_().mul_(0.5 * scale))
    return h.square().add_(1.0).reciprocal_().mul_(scale / math.pi)  # cauchy


def _fsp_forward(h: Tensor, fsp: FSP, eps: float | None, rate: float):
    """The forward of ``_FSPCall`` on rows ``h`` (M, C) in the math dtype: the straight-through
    latent (M, C), the level indices, the moment loss, the statistics (4, C), the acceptance
    rate of the perturbation (None without one) and the tensors the backward needs."""
    eps = eps or torch.finfo(h.dtype).eps
    # two passes (mean, then squared deviations): var_mean's Welford reduction down the
    # rows is several times slower for few channels
    mean = h.mean(0)
    centred = h - mean
    variance = (centred * centred).sum(0).div_(max(h.shape[0] - 1, 0))
    # a NaN/Inf anywhere makes its channel's variance NaN/Inf; the exact test runs only
    # then (a finite batch whose variance overflows passes it)
    root = variance.sqrt()
    std = root.clamp_min(fsp.vector_norm.eps)
    u = centred / std
    u2 = u * u
    skewness = (u2 * u).mean(0)
    kurtosis = (u2 * u2).mean(0) - 3.0
    stats = torch.stack((mean, variance, skewness, kurtosis))
    targets, weights = fsp.vector_norm.constants(h)
    distance = stats - targets
    weighted = distance * weights  # weights already divided by C
    loss = torch.dot(distance.view(-1), weighted.view(-1))
    # a NaN/Inf anywhere makes its channel's statistics and so the loss NaN/Inf; the exact
    # test runs only then (a finite batch whose moments overflow passes it)
    if not tracing() and not math.isfinite(float(loss)) \
            and not bool(torch.isfinite(h).all()):
        check_finite(h)

    act = fsp.act_func(h)
    levels = fsp._level_values
    if levels.dtype != h.dtype:
        levels = levels.to(h.dtype)
    level_indices = (act.clamp_max(1.0 - eps) * levels).floor_()
    centres = (level_indices + 0.5) / levels
    q_act = act + (centres - act)  # the straight-through value, rounding as z + (q - z)
    accept_prob = None
    if rate < 1.0:
        # uniform noise up to half a bin either way
        proposal = act + (torch.rand_like(act) - 0.5) / levels
        accept = (proposal > 0.0) & (proposal < 1.0)
        accept_prob = accept.sum() / accept.numel()  # float32, as .float().mean()
        perturbed = torch.where(accept, proposal, act)
        q_act = torch.where(torch.rand_like(q_act) > rate, perturbed, q_act)
    if fsp.need_inv_act:
        q = fsp.inv_act_func(q_act.clamp(eps, 1.0 - eps))
        q = h + (q - h)
    else:
        q = (q_act - 0.5) / _UNIT_UNIFORM_STD
    return q, level_indices, loss, stats, accept_prob, (h, act, centred, std, root, variance,
                                                       stats, weighted)


class _FSPCall(torch.autograd.Function):
    """The moment loss, CDF activation, binning, perturbation and rescaling of ``FSP.forward``
    in one autograd node: the call is dominated by per-operation overhead, and the backward of
    the chain has a short closed form.

    Forward on h (M, C): ``u = (h - mean) / std`` per channel, the loss of ``VectorNorm``, and
    the straight-through latent ``q``. Backward: ``q`` depends on ``h`` through the activation
    only (the bin and the noise are constants), so ``dq/dh = cdf'(h) / std_uniform``, or 1 with
    ``need_inv_act``; the loss is a cubic in ``u`` per channel (derived in
    ``_moment_loss_gradient``).
    """

    @staticmethod
    def forward(ctx, z, fsp, eps, rate, out_dtype):
        # z: (..., C); the flattening and the float32 cast of half inputs happen here, not as
        # autograd nodes around this one
        ctx.in_shape, ctx.in_dtype = z.shape, z.dtype
        h = z.reshape(-1, z.shape[-1])
        if h.dtype in (torch.float16, torch.bfloat16):
            h = h.float()  # bin edges and index sums need more than 8-11 bits
        q, level_indices, loss, stats, accept_prob, saved = _fsp_forward(h, fsp, eps, rate)
        ctx.save_for_backward(*saved)
        ctx.fsp = fsp
        ctx.set_materialize_grads(False)  # no zero gradients for the unused outputs
        ctx.mark_non_differentiable(level_indices, stats)
        q = q.to(out_dtype).view(*z.shape[:-1], q.shape[-1])
        return q, level_indices, loss, stats, accept_prob

    @staticmethod
    def backward(ctx, grad_q, _grad_levels, grad_loss, _grad_stats, _grad_prob):
        h, act, centred, std, root, variance, stats, weighted = ctx.saved_tensors
        fsp = ctx.fsp
        if grad_q is not None:
            grad_q = grad_q.reshape(h.shape).to(h.dtype)
        grad_h = _FSPCall._grad_h(fsp, grad_q, grad_loss, h, act, centred, std, root,
                                  variance, stats, weighted)
        if grad_h is not None:
            grad_h = grad_h.to(ctx.in_dtype).view(ctx.in_shape)
        return grad_h, None, None, None, None

    @staticmethod
    def _grad_h(fsp, grad_q, grad_loss, h, act, centred, std, root, variance, stats, weighted):
        moment = None
        if grad_loss is not None and fsp.vector_norm.active:
            moment = _moment_loss_gradient(grad_loss, centred, std, root, variance, stats,
                                           weighted, fsp.vector_norm)
        if grad_q is None:
            return moment
        if fsp.need_inv_act:
            return grad_q if moment is None else moment.add_(grad_q)
        slope = _cdf_slope(fsp.act_name, h, act, 1.0 / _UNIT_UNIFORM_STD)
        if moment is None:
            return slope.mul_(grad_q)
        return moment.addcmul_(grad_q, slope)


def _keep_for_backward(ctx, tensors: tuple[Tensor, ...], fsp: FSP, b_in: Tensor | None,
                       b_out: Tensor | None, level_indices: Tensor, stats: Tensor) -> None:
    """What the forward of a fused projection (either layout) leaves its backward: ``tensors``,
    the module, which projections have a bias; the indices and statistics take no gradient, and
    an unused output hands back None rather than zeros."""
    ctx.save_for_backward(*tensors)
    ctx.fsp = fsp
    ctx.has_bias = (b_in is not None, b_out is not None)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(level_indices, stats)


class _ProjectedFSP(torch.autograd.Function):
    """project_in -> ``_FSPCall`` -> project_out as one autograd node, for float32/float64
    rows (N, dim) projected to a few channels and back.

    Why: at (8, 1024, 256) the call is memory traffic over the (N, dim) tensors. As one node
    the backward copies an expanded output gradient once and writes the input gradient into
    that copy, and gets the weight and bias gradients of project_out from one product against
    [q, 1] (see fsq._ProjectedFSQ); the weight gradients run split over the CPU threads
    (narrow_linear.narrow_outer).
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, fsp, eps, rate):
        h = x @ w_in.t() if b_in is None else torch.addmm(b_in, x, w_in.t())
        q, level_indices, loss, stats, accept_prob, saved = _fsp_forward(h, fsp, eps, rate)
        out = q @ w_out.t() if b_out is None else torch.addmm(b_out, q, w_out.t())
        _keep_for_backward(ctx, (x, w_in, w_out, q, *saved), fsp, b_in, b_out, level_indices,
                           stats)
        return out, level_indices, loss, stats, accept_prob

    @staticmethod
    def backward(ctx, grad_out, _grad_levels, grad_loss, _grad_stats, _grad_prob):
        x, w_in, w_out, q, *saved = ctx.saved_tensors
        in_bias, out_bias = ctx.has_bias
        grad_q = grad_w_out = grad_b_out = spare = None
        if grad_out is not None:
            # one contiguous copy (out.sum() hands back an expanded gradient); being ours, it
            # later takes the input gradient
            given = grad_out
            grad_out = grad_out.contiguous()
            spare = grad_out if grad_out is not given and grad_out.shape == x.shape else None
            if out_bias:
                both = narrow_outer(torch.cat([q, torch.ones_like(q[:, :1])], 1), grad_out)
                grad_w_out, grad_b_out = both[:-1].t(), both[-1]
            else:
                grad_w_out = narrow_outer(q, grad_out).t()
            # a row-major (dim, C) weight is fast only as the transpose of its transpose
            grad_q = grad_out @ w_out.t().contiguous().t()
        grad_h = _FSPCall._grad_h(ctx.fsp, grad_q, grad_loss, *saved)
        if grad_h is None:
            return None, None, None, grad_w_out, grad_b_out, None, None, None
        grad_x = torch.mm(grad_h, w_in, out=spare) if spare is not None else grad_h @ w_in
        grad_w_in = narrow_outer(grad_h, x)
        grad_b_in = grad_h.sum(0) if in_bias else None
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def _left(weight: Tensor, x3: Tensor, bias: Tensor | None = None, out: Tensor | None = None
          ) -> Tensor:
    """``bias[:, None] + weight @ x3[b]`` for each b of x3 (b, in, n): (b, out, n)."""
    weight = weight.expand(x3.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(weight, x3, out=out)
    return torch.baddbmm(bias[:, None], weight, x3, out=out)


class _ProjectedFSPChannelFirst(torch.autograd.Function):
    """``_ProjectedFSP`` for channel-first input (b, dim, n), the projections applied in that
    layout (``W @ z[b]``: no transposed copy of the wide input, output or gradients), each
    product in the operand order CPU BLAS runs fast: at (8, 64, 32, 32) the weight gradient of
    project_out as ``q[b] @ g[b].T`` is 2.5x faster than ``g[b] @ q[b].T`` (what autograd
    forms), and project_out on a contiguous q 1.5x faster than on q's transposed view."""

    @staticmethod
    def forward(ctx, z3, w_in, b_in, w_out, b_out, fsp, eps, rate):
        batch, _, spots = z3.shape
        h3 = _left(w_in, z3, b_in)  # (b, C, n)
        h = h3.transpose(1, 2).reshape(-1, h3.shape[1])  # rows (b n, C), a small copy
        q, level_indices, loss, stats, accept_prob, saved = _fsp_forward(h, fsp, eps, rate)
        q3 = q.view(batch, spots, -1).transpose(1, 2).contiguous()  # (b, C, n)
        out = _left(w_out, q3, b_out)
        _keep_for_backward(ctx, (z3, w_in, w_out, q3, *saved), fsp, b_in, b_out, level_indices,
                           stats)
        return out, level_indices, loss, stats, accept_prob

    @staticmethod
    def backward(ctx, grad_out, _grad_levels, grad_loss, _grad_stats, _grad_prob):
        z3, w_in, w_out, q3, *saved = ctx.saved_tensors
        in_bias, out_bias = ctx.has_bias
        batch, channels, spots = q3.shape
        grad_q = grad_w_out = grad_b_out = spare = None
        if grad_out is not None:
            given = grad_out
            g3 = grad_out.contiguous()  # out.sum() hands back an expanded gradient
            spare = g3 if g3 is not given else None  # ours: it takes the input gradient
            grad_w_out = torch.bmm(q3, g3.transpose(1, 2)).sum(0).t()
            grad_b_out = g3.sum((0, 2)) if out_bias else None
            grad_q = _left(w_out.t(), g3).transpose(1, 2).reshape(-1, channels)
        grad_h = _FSPCall._grad_h(ctx.fsp, grad_q, grad_loss, *saved)
        if grad_h is None:
            return None, None, None, grad_w_out, grad_b_out, None, None, None
        grad_h3 = grad_h.view(batch, spots, channels).transpose(1, 2)
        grad_z3 = _left(w_in.t(), grad_h3, out=spare)
        grad_w_in = torch.bmm(grad_h3, z3.transpose(1, 2)).sum(0)
        grad_b_in = grad_h.sum(0) if in_bias else None
        return grad_z3, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def _moment_loss_gradient(grad_loss: Tensor, centred: Tensor, std: Tensor, root: Tensor,
                          variance: Tensor, stats: Tensor, weighted: Tensor,
                          norm: VectorNorm) -> Tensor:
    """d loss / d h of ``VectorNorm`` in closed form, a cubic in ``u = (h - mean) / std``.

    With N rows, G_k = d loss / d stat_k = 2 w_k (stat_k - target_k) / C, M_k = mean(u^k)
    (M_2 = var (N - 1) / (N std^2), M_3 = skewness, M_4 = kurtosis + 3), ``dmean/dh_i = 1/N``,
    ``dvar/dh_i = 2 std u_i / (N - 1)``, ``dstd/dh_i = u_i / (N - 1)`` (0 where std is clamped)
    and ``du_j/dh_i = (delta_ij - 1/N) / std - u_j dstd/dh_i / std``:

        dskew/dh_i = 3 (u_i^2 - M_2) / (N std) - 3 M_3 dstd/dh_i / std
        dkurt/dh_i = 4 (u_i^3 - M_3) / (N std) - 4 M_4 dstd/dh_i / std
    """
    n = centred.shape[0]
    if not norm.higher:
        # mean and variance only: G_1 / N + G_2 2 (h_i - mean) / (N - 1), G = 2 w d / C
        g = weighted[:2] * grad_loss
        return torch.addcmul(g[0], centred, g[1], value=2.0 * n / (n - 1)).mul_(2.0 / n)
    g = weighted * (grad_loss * 2.0)  # (4, C): G_1..G_4
    u = centred / std
    g3_s = g[2] / std
    g4_s = g[3] / std
    m2 = variance * (n - 1) / (n * std * std)
    m3 = stats[2]
    m4 = stats[3] + 3.0
    unclamped = (root >= norm.eps).to(u.dtype)
    a0 = g[0] / n - (3.0 * g3_s * m2 + 4.0 * g4_s * m3) / n
    a1 = 2.0 * g[1] * std / (n - 1) - (3.0 * g3_s * m3 + 4.0 * g4_s * m4) * unclamped / (n - 1)
    a2 = 3.0 * g3_s / n
    a3 = 4.0 * g4_s / n
    return ((a3 * u + a2) * u + a1) * u + a0


class FSPOutput(NamedTuple):
    quantized: Tensor
    indices: Tensor  # int64, the input's shape without the channel axis
    norm_loss: Tensor
    info: dict


class FSP(nn.Module):
    """Finite scalar perturbation (see the module docstring)."""

    def __init__(self, levels: list[int] | tuple[int, ...], dim: int | None = None,
                 channel_first: bool = False, projection_has_bias: bool = True,
                 act_name: str = "tanh", quantize_rate: float = 0.0, need_inv_act: bool = False,
                 vector_norm: str = "var_tanh"):
        super().__init__()
        if not 0.0 <= quantize_rate <= 1.0:
            raise ValueError(f"quantize_rate must be in [0.0, 1.0], got {quantize_rate}")
        levels = [int(level) for level in levels]
        if not levels or any(level < 1 for level in levels):
            raise ValueError(f"levels must be positive integers, got {levels}")
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32),
                             persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        # the levels as floats for the bin arithmetic; follows .double() etc. as a float buffer
        self.register_buffer("_level_values", torch.tensor(levels, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("_basis_values", torch.tensor(basis, dtype=torch.float32),
                             persistent=False)
        self.codebook_size = math.prod(levels)
        self.has_projections = self.dim != self.codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.act_name = act_name
        self.act_func, self.inv_act_func = build_cdf_act(act_name)
        self.need_inv_act = need_inv_act
        self.quantize_rate = quantize_rate
        self.vector_norm = VectorNorm.build(vector_norm)

    def extra_repr(self) -> str:
        return (f"levels={self._levels.tolist()}, codebook_size={self.codebook_size}, "
                f"dim={self.dim}, act_name={self.act_name!r}, "
                f"need_inv_act={self.need_inv_act}, quantize_rate={self.quantize_rate}")

    def quantize_act_value(self, act_z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """[0, 1] values -> bin centres (straight-through) and integer bin indices (float)."""
        levels = self._levels.to(act_z.dtype)
        level_indices = (act_z.clamp_max(1.0 - eps) * levels).floor()
        centres = (level_indices + 0.5) / levels
        return act_z + (centres - act_z).detach(), level_indices.detach()

    def level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        return (level_indices.long() * self._basis).sum(-1)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        indices = indices.long().unsqueeze(-1)
        return torch.div(indices, self._basis, rounding_mode="floor") % self._levels

    def indices_to_act_value(self, indices: Tensor) -> Tensor:
        return (self.indices_to_level_indices(indices).float() + 0.5) / self._levels

    def _act_to_latent(self, q_act: Tensor, eps: float) -> Tensor:
        if self.need_inv_act:
            return self.inv_act_func(q_act.clamp(eps, 1.0 - eps))
        return (q_act - 0.5) / _UNIT_UNIFORM_STD

    def indices_to_codes(self, indices: Tensor, eps: float = 1e-6) -> Tensor:
        codes = self.project_out(self._act_to_latent(self.indices_to_act_value(indices), eps))
        return codes.movedim(-1, 1) if self.channel_first else codes

    def _project_channel_first(self, z: Tensor) -> bool:
        """Whether to project a channel-first input in its own layout: ``W @ z[b]`` per image
        needs no transposed copy of the wide input, its gradient or the output."""
        return self.channel_first and z.ndim > 2 and self._fused_projections(z)

    def forward(self, z: Tensor, eps: float | None = None) -> FSPOutput:
        check_tensor(z, self.dim, 1 if self.channel_first else -1)
        if self._project_channel_first(z):
            return self._forward_channel_first(z, eps)
        if self.channel_first:
            z = z.movedim(1, -1)
        shape = z.shape
        rate = self.quantize_rate if self.training else 1.0
        if self._fused_projections(z):
            pin, pout = self.project_in, self.project_out
            out, level_indices, norm_loss, stats, accept_prob = _ProjectedFSP.apply(
                z.reshape(-1, self.dim), pin.weight, pin.bias, pout.weight, pout.bias, self,
                eps, rate)
            return self._output(out.view(shape), level_indices, norm_loss, stats, accept_prob,
                                shape)
        if self.has_projections:
            h = narrow_linear(z.reshape(-1, self.dim), self.project_in)
            out_dtype = self.project_out.weight.dtype
        else:
            h, out_dtype = z, z.dtype
        q, level_indices, norm_loss, stats, accept_prob = _FSPCall.apply(
            h, self, eps, rate, out_dtype)
        out = q
        if self.has_projections:
            out = narrow_linear(q, self.project_out).view(*shape[:-1], self.dim)
        return self._output(out, level_indices, norm_loss, stats, accept_prob, shape)

    def _fused_projections(self, z: Tensor) -> bool:
        """Whether the projected call runs as one node (``_ProjectedFSP``): float32/float64
        input in the projections' dtype, autocast off."""
        return (self.has_projections and z.dtype in (torch.float32, torch.float64)
                and z.dtype == self.project_in.weight.dtype
                and z.dtype == self.project_out.weight.dtype
                and not torch.is_autocast_enabled(z.device.type))

    def _output(self, out: Tensor, level_indices: Tensor, norm_loss: Tensor, stats: Tensor,
                accept_prob: Tensor | None, shape: torch.Size) -> FSPOutput:
        """The call's result from rows: ``out`` (..., dim) in the channels-last ``shape``."""
        info: dict = {}
        if accept_prob is not None:
            info["p_accept_prob"] = accept_prob
        if self.codebook_size <= 1 << 24:  # every partial sum exact in float32 and float64
            indices = (level_indices @ self._basis_values.to(level_indices.dtype)).long()
        else:
            indices = self.level_indices_to_indices(level_indices)
        indices = indices.view(shape[:-1])
        if self.channel_first:
            out = out.movedim(-1, 1)
        mean, variance, skewness, kurtosis = stats
        return FSPOutput(out, indices, norm_loss, {
            "level_indices": level_indices.view(*shape[:-1], -1),
            "norm_info": {"mean": mean, "variance": variance, "skewness": skewness,
                          "kurtosis": kurtosis},
            **info})

    def _forward_channel_first(self, z: Tensor, eps: float | None) -> FSPOutput:
        batch, positions = z.shape[0], z.shape[2:]
        pin, pout = self.project_in, self.project_out
        rate = self.quantize_rate if self.training else 1.0
        out, level_indices, norm_loss, stats, accept_prob = _ProjectedFSPChannelFirst.apply(
            z.reshape(batch, self.dim, -1), pin.weight, pin.bias, pout.weight, pout.bias, self,
            eps, rate)
        info: dict = {}
        if accept_prob is not None:
            info["p_accept_prob"] = accept_prob
        if self.codebook_size <= 1 << 24:
            indices = (level_indices @ self._basis_values.to(level_indices.dtype)).long()
        else:
            indices = self.level_indices_to_indices(level_indices)
        mean, variance, skewness, kurtosis = stats
        return FSPOutput(out.view(batch, self.dim, *positions),
                         indices.view(batch, *positions), norm_loss, {
            "level_indices": level_indices.view(batch, *positions, -1),
            "norm_info": {"mean": mean, "variance": variance, "skewness": skewness,
                          "kurtosis": kurtosis},
            **info})
