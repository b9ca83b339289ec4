"""Tests of the FSQ family: FSQ, ResidualFSQ, GroupedResidualFSQ, FSP and LatentQuantize.

Numerics are checked against a NumPy re-implementation of FSQ written from the paper
(Mentzer et al. 2023, section 3 and appendix A.1: tanh bound with a half-level offset for even
levels, round, mixed-radix index), against autograd on the textbook straight-through
expression, and against vector_quantize_pytorch where the library is right.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vqvae import FSP, FSQ, GroupedResidualFSQ, LatentQuantize, QuantizerInputError, ResidualFSQ

EPS = 1e-3  # the bound's margin, as in the library (the paper's listing has 1 - eps)


# ---------------------------------------------------------------------- NumPy reference

def np_fsq(z: np.ndarray, levels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Paper FSQ in float64: codes in [-1, 1] and mixed-radix indices (first channel fastest)."""
    lv = np.asarray(levels, dtype=np.float64)
    half_l = (lv - 1) * (1 + EPS) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    shift = np.arctanh(offset / half_l)
    rounded = np.round(np.tanh(z + shift) * half_l - offset)  # half to even, as torch.round
    half_width = lv // 2
    digits = (rounded + half_width).astype(np.int64)
    basis = np.cumprod([1] + list(levels[:-1]))
    return rounded / half_width, (digits * basis).sum(-1)


def np_codes_of_all_indices(levels: list[int], symmetric: bool = False) -> np.ndarray:
    """Row k: the code whose mixed-radix digits spell k, built by enumeration (not division)."""
    rows = []
    for digits in itertools.product(*[range(level) for level in reversed(levels)]):
        digits = np.array(digits[::-1], dtype=np.float64)  # first channel varies fastest
        lv = np.asarray(levels, dtype=np.float64)
        if symmetric:
            rows.append(digits * 2 / (lv - 1) - 1)
        else:
            half_width = lv // 2
            rows.append((digits - half_width) / half_width)
    return np.stack(rows)


# ---------------------------------------------------------------------- FSQ numerics

@pytest.mark.parametrize("levels", [[3, 4], [8, 5, 5, 5], [7, 6, 4]])
def test_fsq_matches_numpy_paper_reference(levels):
    torch.manual_seed(0)
    z = torch.randn(4, 300, len(levels), dtype=torch.float64) * 2
    out, indices = FSQ(levels)(z)
    codes, ref_indices = np_fsq(z.numpy(), levels)
    np.testing.assert_array_equal(out.numpy(), codes)
    np.testing.assert_array_equal(indices.numpy(), ref_indices)
    assert indices.dtype == torch.int64
    # every level of every channel is used on this spread of inputs
    for channel, level in enumerate(levels):
        assert len(np.unique(codes[..., channel])) == level


def test_fsq_zero_maps_to_the_zero_code():
    # hand-worked: z = 0 must land on code 0 whether the level count is odd or even
    out, _ = FSQ([3, 4, 5, 8])(torch.zeros(1, 1, 4))
    assert torch.equal(out, torch.zeros(1, 1, 4))


@pytest.mark.parametrize("levels", [[3, 4], [8, 5, 5, 5]])
def test_fsq_index_round_trip_over_the_whole_code_space(levels):
    fsq = FSQ(levels).double()
    n = int(np.prod(levels))
    every = torch.arange(n)
    codes = fsq.indices_to_codes(every)
    np.testing.assert_allclose(codes.numpy(), np_codes_of_all_indices(levels), atol=1e-7)
    assert torch.equal(fsq.codes_to_indices(codes), every)
    # and forward reaches each code: invert the bound at every code point
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + EPS) / 2
    offset = (lv % 2 == 0).double() * 0.5
    shift = torch.atanh(offset / half_l)
    z = torch.atanh((codes * (lv // 2) + offset) / half_l) - shift
    out, indices = fsq(z[None])
    assert torch.equal(indices[0], every)
    assert torch.allclose(out[0].float(), codes)


@pytest.mark.parametrize("levels", [[2, 3], [5, 4, 4]])
def test_symmetric_fsq_round_trip_and_numpy(levels):
    fsq = FSQ(levels, preserve_symmetry=True).double()
    n = int(np.prod(levels))
    codes = fsq.indices_to_codes(torch.arange(n))
    np.testing.assert_allclose(codes.numpy(), np_codes_of_all_indices(levels, True), atol=1e-7)
    assert torch.equal(fsq.codes_to_indices(codes), torch.arange(n))
    z = torch.randn(2, 200, len(levels), dtype=torch.float64) * 2
    out, indices = fsq(z)
    lv = np.asarray(levels, dtype=np.float64)
    digits = np.floor((lv - 1) * (np.tanh(z.numpy()) + 1) / 2 + 0.5)
    np.testing.assert_allclose(out.numpy(), digits * 2 / (lv - 1) - 1, atol=1e-12)
    basis = np.cumprod([1] + levels[:-1])
    np.testing.assert_array_equal(indices.numpy(), (digits.astype(np.int64) * basis).sum(-1))


@pytest.mark.parametrize("options", [{}, {"preserve_symmetry": True},
                                     {"bound_hard_clamp": True}, {"dim": 6}])
def test_fsq_straight_through_gradient_matches_autograd(options):
    levels = [8, 5, 4]
    torch.manual_seed(1)
    fsq = FSQ(levels, **options).double()
    dim = options.get("dim", 3)
    x = (torch.randn(2, 50, dim, dtype=torch.float64) * 1.5).requires_grad_()
    weight = torch.randn(2, 50, dim, dtype=torch.float64)
    (fsq(x).quantized * weight).sum().backward()

    # textbook: the quantizer's value with round/floor replaced by the identity
    x_ref = x.detach().clone().requires_grad_()
    h = fsq.project_in(x_ref)
    lv = torch.tensor(levels, dtype=torch.float64)
    if options.get("preserve_symmetry"):
        continuous = torch.tanh(h)
    else:
        half_l = (lv - 1) * (1 + EPS) / 2
        offset = (lv % 2 == 0).double() * 0.5
        clamp = options.get("bound_hard_clamp", False)
        shift = offset / half_l if clamp else torch.atanh(offset / half_l)
        squashed = (h + shift).clamp(-1, 1) if clamp else torch.tanh(h + shift)
        continuous = (squashed * half_l - offset) / (lv // 2)
    (fsq.project_out(continuous) * weight).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", [30, 400])  # below and above 4 rows per code (20 codes)
def test_projected_fsq_against_numpy_and_textbook_gradients(dtype, rows):
    """The fused projected call, with few rows per code (each row projected) and with many
    (each code projected once, the rows gathered), against NumPy for the output and indices
    and against autograd on the textbook expression for every gradient."""
    levels = [5, 4]
    torch.manual_seed(3)
    fsq = FSQ(levels, dim=6).to(dtype)
    x = (torch.randn(2, rows, 6, dtype=dtype) * 1.5).requires_grad_()
    weight = torch.randn(2, rows, 6, dtype=dtype)
    out, indices = fsq(x)
    (out * weight).sum().backward()

    w_in, b_in = fsq.project_in.weight.detach().double(), fsq.project_in.bias.detach().double()
    w_out = fsq.project_out.weight.detach().double().numpy()
    b_out = fsq.project_out.bias.detach().double().numpy()
    h = (x.detach().double() @ w_in.t() + b_in).numpy()
    codes, ref_indices = np_fsq(h, levels)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(out.detach().double().numpy(), codes @ w_out.T + b_out,
                               atol=tol, rtol=0)
    np.testing.assert_array_equal(indices.numpy(), ref_indices)

    ref = FSQ(levels, dim=6).double()
    ref.load_state_dict(fsq.state_dict())
    x_ref = x.detach().double().requires_grad_()
    lv = torch.tensor(levels, dtype=torch.float64)
    half_l = (lv - 1) * (1 + EPS) / 2
    offset = (lv % 2 == 0).double() * 0.5
    continuous = (torch.tanh(ref.project_in(x_ref) + torch.atanh(offset / half_l)) * half_l
                  - offset) / (lv // 2)
    # straight through: the value of the NumPy codes, the derivative of the continuous bound
    straight = continuous + (torch.from_numpy(codes) - continuous).detach()
    (ref.project_out(straight) * weight.double()).sum().backward()
    grad_tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert torch.allclose(x.grad.double(), x_ref.grad, atol=grad_tol)
    for ours, textbook in zip(fsq.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(ours.grad.double(), textbook.grad, atol=grad_tol, rtol=1e-4)


def test_fsq_matches_library_for_same_weights():
    lib = pytest.importorskip("vector_quantize_pytorch")
    for options in [dict(levels=[8, 5, 5, 5], dim=16), dict(levels=[5, 4], num_codebooks=3,
                                                             dim=10),
                    dict(levels=[4, 3], preserve_symmetry=True, channel_first=True, dim=5)]:
        torch.manual_seed(0)
        theirs = lib.FSQ(**options)
        ours = FSQ(**options)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, options["dim"], 12) if options.get("channel_first") else \
            torch.randn(2, 12, options["dim"])
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        (out1, idx1), (out2, idx2) = theirs(x1), ours(x2)
        out1.square().sum().backward()
        out2.square().sum().backward()
        assert torch.equal(out1, out2)
        assert torch.equal(idx1.long(), idx2) and idx1.shape == idx2.shape
        assert torch.allclose(x1.grad, x2.grad, atol=1e-6)


# ---------------------------------------------------------------------- dtypes and layouts

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("force_f32", [True, False])
def test_half_inputs_quantize_in_float32(dtype, force_f32):
    levels = [8, 5, 5, 5]  # 1000 codes: past what bfloat16 can count exactly (256)
    fsq = FSQ(levels, force_quantization_f32=force_f32)
    z = (torch.randn(2, 500, 4) * 2).to(dtype)
    out, indices = fsq(z)
    assert out.dtype == dtype and indices.dtype == torch.int64
    codes, ref_indices = np_fsq(z.double().numpy(), levels)  # same values, float64
    np.testing.assert_array_equal(indices.numpy(), ref_indices)
    assert torch.equal(out, torch.from_numpy(codes).to(dtype))
    assert torch.equal(fsq.indices_to_codes(indices).to(dtype), out)


def test_large_level_products_give_exact_int64_indices():
    levels = [8] * 11  # 2**33 codes: past int32, and past float32's exact integers
    fsq = FSQ(levels)
    top = torch.tensor([2 ** 33 - 1, 2 ** 33 - 2, 2 ** 24 + 1])
    codes = fsq._indices_to_codes(top).float()
    assert torch.equal(fsq.codes_to_indices(codes), top)
    lv = 8.0
    half_l = (lv - 1) * (1 + EPS) / 2
    z = torch.atanh((codes * 4 + 0.5) / half_l) - float(np.arctanh(0.5 / half_l))
    assert torch.equal(fsq(z.double()[None]).indices[0], top)


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 5)])
def test_channel_first_images_and_video(spatial):
    torch.manual_seed(0)
    fsq = FSQ([8, 5, 5, 5], dim=6)
    x = torch.randn(2, 6, *spatial)
    out, indices = fsq(x)
    assert out.shape == x.shape and indices.shape == (2, *spatial)
    last = fsq(x.movedim(1, -1).reshape(2, -1, 6))
    assert torch.allclose(out, last.quantized.reshape(2, *spatial, 6).movedim(-1, 1))
    assert torch.equal(indices, last.indices.reshape(2, *spatial))
    assert torch.allclose(fsq.indices_to_codes(indices), out, atol=1e-6)
    # a 3-d input is channel first only when asked
    seq = FSQ([8, 5, 5, 5], dim=6, channel_first=True)
    seq.load_state_dict(fsq.state_dict())
    out3, idx3 = seq(x.flatten(2))
    assert torch.allclose(out3, out.flatten(2)) and torch.equal(idx3, indices.flatten(1))


def test_num_codebooks_and_keep_num_codebooks_dim():
    fsq = FSQ([5, 4], num_codebooks=3)
    single = FSQ([5, 4])
    z = torch.randn(2, 7, 6) * 2
    out, indices = fsq(z)
    assert indices.shape == (2, 7, 3)
    for c in range(3):
        part_out, part_idx = single(z[..., 2 * c:2 * c + 2])
        assert torch.equal(indices[..., c], part_idx)
        assert torch.equal(out[..., 2 * c:2 * c + 2], part_out)
    assert torch.equal(fsq.indices_to_codes(indices), out)
    kept = FSQ([5, 4], keep_num_codebooks_dim=True)(z[..., :2]).indices
    assert kept.shape == (2, 7, 1)
    with pytest.raises(ValueError, match="keep_num_codebooks_dim"):
        FSQ([5, 4], num_codebooks=2, keep_num_codebooks_dim=False)


# ---------------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("make", [
    lambda: FSQ([8, 5, 5, 5]), lambda: FSQ([8, 5, 5, 5], dim=8),
    lambda: ResidualFSQ(levels=[5, 5], num_quantizers=2, dim=8),
    lambda: FSP([8, 5, 5, 5], dim=8),
])
def test_non_finite_input_is_refused(make, bad):
    module = make()
    dim = module.dim
    x = torch.randn(2, 5, dim)
    x[1, 2, 0] = bad
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(QuantizerInputError, match="non-finite"):
        module(x)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_latent_quantize_non_finite_changes_no_values():
    lq = LatentQuantize([5, 5, 8], dim=3,
                        in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    before = [v.detach().clone() for v in lq.values_per_latent]
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    with pytest.raises(QuantizerInputError, match="non-finite"):
        lq(x)
    assert all(torch.equal(a, b) for a, b in zip(before, lq.values_per_latent, strict=True))


def test_wrong_shapes_and_types_are_named():
    with pytest.raises(QuantizerInputError, match="dimension of 4"):
        FSQ([8, 5, 5, 5])(torch.randn(2, 3, 5))
    with pytest.raises(QuantizerInputError, match="floating"):
        FSQ([8, 5, 5, 5])(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="preserve_symmetry"):
        FSQ([2, 3])
    with pytest.raises(QuantizerInputError, match="integer indices"):
        FSQ([3, 3]).indices_to_codes(torch.zeros(2, 3))


# ---------------------------------------------------------------------- noise dropout

def test_noise_dropout_is_one_bin_wide_around_the_bounded_value():
    levels = [9, 9]  # step 2/8: the library's U(-0.5, 0.5) would span four bins
    fsq = FSQ(levels, preserve_symmetry=True, noise_dropout=1.0)
    z = torch.randn(4, 4000, 2)
    torch.manual_seed(0)
    noisy = fsq(z).quantized
    bounded = torch.tanh(z)
    half_step = 1.0 / (9 - 1)
    assert (noisy - bounded).abs().max() <= half_step + 1e-6
    assert (noisy - bounded).abs().max() > 0.9 * half_step  # the noise does fill the bin
    assert noisy.abs().max() <= 1.0
    fsq.eval()
    assert torch.equal(fsq(z).quantized, FSQ(levels, preserve_symmetry=True)(z).quantized)
    half = FSQ(levels, preserve_symmetry=True, noise_dropout=0.5)
    exact = FSQ(levels, preserve_symmetry=True)(z).quantized
    share = (half(z).quantized != exact).float().mean()
    assert 0.4 < share < 0.6


# ---------------------------------------------------------------------- residual forms

def test_residual_fsq_readme_example_and_decode():
    torch.manual_seed(0)
    residual_fsq = ResidualFSQ(dim=32, levels=[8, 5, 5, 3], num_quantizers=4)
    x = torch.randn(1, 64, 32)
    residual_fsq.eval()
    quantized, indices = residual_fsq(x)
    assert quantized.shape == (1, 64, 32) and indices.shape == (1, 64, 4)
    assert torch.all(quantized == residual_fsq.get_output_from_indices(indices))
    # independent: sum of scaled symmetric codes, layer by layer, in float64
    h = residual_fsq.project_in(x).double()
    h = torch.tanh(h / (1 + 1 / (torch.tensor([8, 5, 5, 3.]) - 1))) * (
        1 + 1 / (torch.tensor([8, 5, 5, 3.]) - 1))
    lv = torch.tensor([8, 5, 5, 3], dtype=torch.float64)
    residual, total = h, torch.zeros_like(h)
    for q in range(4):
        u = residual / lv ** -q
        digit = torch.floor((lv - 1) * (u.clamp(-1, 1) + 1) / 2 + 0.5)
        part = (digit * 2 / (lv - 1) - 1) * lv ** -q
        total, residual = total + part, residual - part
        basis = torch.tensor([1, 8, 40, 200])
        assert torch.equal(indices[0, :, q], (digit.long()[0] * basis).sum(-1))
    assert torch.allclose(residual_fsq.project_out(total.float()), quantized, atol=1e-5)


def test_residual_gradient_is_sum_of_layer_derivatives():
    # autograd on the library's own construction (each layer straight-through, residual
    # detached) against our one-node backward
    torch.manual_seed(0)
    ours = ResidualFSQ(levels=[5, 4], num_quantizers=3, bound_hard_clamp=False).double()
    x = (torch.randn(3, 40, 2, dtype=torch.float64) * 0.7).requires_grad_()
    w = torch.randn(3, 40, 2, dtype=torch.float64)
    (ours(x)[0] * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    residual, out = x_ref, 0.0
    for scale in ours.scales.double():
        u = residual / scale
        t = torch.tanh(u)
        bracket = (torch.tensor([4.0, 3.0], dtype=torch.float64) * (t + 1) / 2 + 0.5)
        bracket = bracket + (bracket.floor() - bracket).detach()
        part = (bracket * 2 / torch.tensor([4.0, 3.0], dtype=torch.float64) - 1) * scale
        residual, out = residual - part.detach(), out + part
    (out * w).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-12)


def test_residual_and_grouped_match_library():
    lib = pytest.importorskip("vector_quantize_pytorch")
    for ours_cls, their_cls, options in [
        (ResidualFSQ, lib.ResidualFSQ, dict(dim=16, levels=[8, 5, 5, 3], num_quantizers=4)),
        (GroupedResidualFSQ, lib.GroupedResidualFSQ,
         dict(dim=16, groups=2, levels=[4, 4], num_quantizers=3))]:
        torch.manual_seed(0)
        theirs = their_cls(**options)
        ours = ours_cls(**options)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 10, 16)
        for training in (True, False):
            theirs.train(training)
            ours.train(training)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            (q1, i1), (q2, i2) = theirs(x1), ours(x2)
            q1.square().sum().backward()
            q2.square().sum().backward()
            assert torch.equal(q1, q2) and torch.equal(i1.long(), i2)
            assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
        assert torch.equal(ours.get_output_from_indices(i2), q2)
        _, _, codes = ours(x, return_all_codes=True)
        their_codes = theirs(x, return_all_codes=True)[2]
        if isinstance(their_codes, tuple):  # grouped: one tensor per group
            their_codes = torch.stack(their_codes)
        assert torch.allclose(codes, their_codes)


def test_quantize_dropout_with_image_shaped_channels_last_input():
    rfsq = ResidualFSQ(levels=[5, 5], num_quantizers=4, dim=6, quantize_dropout=True,
                       quantize_dropout_cutoff_index=1)
    x = torch.randn(2, 3, 4, 6)  # (b, h, w, d): the library's null indices assume (b, n)
    quantized, indices = rfsq(x, rand_quantize_dropout_fixed_seed=3)
    assert indices.shape == (2, 3, 4, 4) and quantized.shape == x.shape
    kept = int((indices[0, 0, 0] >= 0).sum())
    assert 2 <= kept <= 4 and (indices[..., kept:] == -1).all()
    rfsq.eval()
    q_eval, i_eval = rfsq(x)
    assert torch.equal(i_eval[..., :kept], indices[..., :kept])
    assert torch.allclose(rfsq.get_output_from_indices(indices), quantized, atol=1e-6)
    # coarse indices decode too
    assert rfsq.get_output_from_indices(i_eval[..., :2]).shape == x.shape


def test_grouped_residual_channel_first_and_decode():
    grfsq = GroupedResidualFSQ(dim=8, groups=2, levels=[5, 5], num_quantizers=2,
                               accept_image_fmap=True, is_channel_first=True).eval()
    x = torch.randn(2, 8, 3, 3)
    quantized, indices = grfsq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 2, 2, 3, 3)


# ---------------------------------------------------------------------- LatentQuantize

def test_latent_quantize_readme_examples():
    quantizer = LatentQuantize(levels=[5, 5, 8], dim=16, commitment_loss_weight=0.1,
                               quantization_loss_weight=0.1)
    image_feats = torch.randn(1, 16, 8, 8)
    quantized, indices, loss = quantizer(image_feats)
    assert quantized.shape == image_feats.shape and indices.shape == (1, 8, 8)
    assert loss.ndim == 0 and loss.item() >= 0
    assert (quantized == quantizer.indices_to_codes(indices)).all()
    assert quantizer(torch.randn(1, 16, 2, 4, 4))[0].shape == (1, 16, 2, 4, 4)
    # the sequence and multi-codebook calls of the README, which the library rejects
    assert quantizer(torch.randn(1, 32, 16))[0].shape == (1, 32, 16)
    model = LatentQuantize(levels=[4, 8, 16], dim=9, num_codebooks=3)
    output, indices, loss = model(torch.randn(2, 3, 9))
    assert output.shape == (2, 3, 9) and indices.shape == (2, 3, 3) and loss.item() >= 0


def test_latent_quantize_nearest_value_against_numpy():
    lq = LatentQuantize([3, 6, 4], dim=3).eval()
    with torch.no_grad():
        for v in lq.values_per_latent:
            v.copy_(torch.sort(torch.randn_like(v)).values)  # learnt, off the initial grid
    z = torch.randn(2, 3, 50)
    out, indices, loss = lq(z)
    assert loss.item() == 0.0
    values = [v.detach().numpy() for v in lq.values_per_latent]
    zn = z.movedim(1, -1).numpy()
    digits = np.stack([np.abs(zn[..., i, None] - values[i]).argmin(-1) for i in range(3)], -1)
    ref = np.stack([values[i][digits[..., i]] for i in range(3)], -1)
    np.testing.assert_array_equal(out.detach().movedim(1, -1).numpy(), ref)
    np.testing.assert_array_equal(indices.numpy(), (digits * np.array([1, 3, 18])).sum(-1))
    assert torch.equal(lq.indices_to_codes(indices), out)  # decode reads the learnt values


def test_latent_quantize_index_round_trip_and_library_truncation():
    lq = LatentQuantize([3, 6, 5], dim=3)
    every = torch.arange(90)
    codes = lq.indices_to_codes(every[None], channel_first=False)[0]
    assert torch.equal(lq.codes_to_indices(codes), every)
    # the library reads indices back from the straight-through output, an ulp off the value,
    # and truncates with .to(int32): some land one below
    lib = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    theirs = lib.LatentQuantize([3, 6], dim=2, optimize_values=False)
    ours = LatentQuantize([3, 6], dim=2, optimize_values=False)
    z = torch.randn(4, 2, 500)
    values = [v.numpy() for v in ours.values_per_latent]
    zn = z.movedim(1, -1).numpy()
    digits = np.stack([np.abs(zn[..., i, None] - values[i]).argmin(-1) for i in range(2)], -1)
    reference = (digits * np.array([1, 3])).sum(-1)
    np.testing.assert_array_equal(ours(z).indices.numpy(), reference)
    assert (theirs(z)[1].long().numpy() != reference).any()


def test_latent_quantize_values_learn():
    torch.manual_seed(0)
    lq = LatentQuantize([5, 5], dim=2)
    optimizer = torch.optim.SGD(lq.parameters(), lr=1.0)
    data = torch.randn(64, 2, 1) * 0.1 + 0.3  # all near 0.3: the nearest values should follow
    start = [v.detach().clone() for v in lq.values_per_latent]
    for _ in range(20):
        _, _, loss = lq(data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(v.grad is not None for v in lq.values_per_latent)
    moved = [(v.detach() - s).abs().max().item() for v, s in
             zip(lq.values_per_latent, start, strict=True)]
    assert min(moved) > 1e-3
    lq.eval()
    out, indices, _ = lq(data)
    assert torch.equal(lq.indices_to_codes(indices), out)


def test_latent_quantize_in_place_optimizer_runs():
    lq = LatentQuantize([5, 5], dim=2,
                        in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    before = [v.detach().clone() for v in lq.values_per_latent]
    lq(torch.randn(4, 2, 8) * 0.2 + 0.1)
    assert any(not torch.equal(a, b.detach()) for a, b in
               zip(before, lq.values_per_latent, strict=True))


# ---------------------------------------------------------------------- FSP

def test_fsp_readme_example_and_bins_against_numpy():
    quantizer = FSP(levels=[8, 5, 5, 5], act_name="normal", quantize_rate=0.5,
                    vector_norm="var")
    x = torch.randn(1, 1024, 4)
    quantized, indices, norm_loss, other_info = quantizer(x)
    assert quantized.shape == (1, 1024, 4) and indices.shape == (1, 1024)
    assert "p_accept_prob" in other_info and norm_loss.ndim == 0
    quantizer.eval()
    quantized, indices, _, _ = quantizer(x.double())
    from math import erf, sqrt
    lv = np.array([8, 5, 5, 5])
    cdf = np.vectorize(lambda v: 0.5 * (1 + erf(v / sqrt(2))))(x.double().numpy())
    digits = np.floor(np.minimum(cdf, 1 - np.finfo(np.float64).eps) * lv)
    np.testing.assert_array_equal(indices.numpy(),
                                  (digits * np.array([1, 8, 40, 200])).sum(-1))
    centre = (digits + 0.5) / lv
    np.testing.assert_allclose(quantized.numpy(), (centre - 0.5) * sqrt(12), atol=1e-12)
    assert torch.allclose(quantizer.indices_to_codes(indices).double(), quantized)


def test_fsp_bfloat16_indices_are_exact():
    fsp = FSP([8, 5, 5, 5]).eval()
    z = torch.randn(1, 4000, 4).bfloat16()
    _, ref, _, _ = fsp(z.float())
    out, indices, _, _ = fsp(z)
    assert torch.equal(indices, ref) and out.dtype == torch.bfloat16
    lib = pytest.importorskip("vector_quantize_pytorch")
    theirs = lib.FSP([8, 5, 5, 5]).eval()
    assert not torch.equal(theirs(z)[1].long(), ref)  # summed in bfloat16: 8 bits


def test_fsp_matches_library_in_eval():
    lib = pytest.importorskip("vector_quantize_pytorch")
    for options in [dict(levels=[4, 3], dim=6, act_name="sigmoid", need_inv_act=True),
                    dict(levels=[4, 3], channel_first=True, act_name="laplace")]:
        torch.manual_seed(0)
        theirs, ours = lib.FSP(**options).eval(), FSP(**options).eval()
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, options.get("dim", 2), 9)
        if not options.get("channel_first"):
            x = x.transpose(1, 2)
        a, b = theirs(x), ours(x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1].long(), b[1])
        assert torch.allclose(a[2], b[2])


# ---------------------------------------------------------------------- drop-in README calls

def test_fsq_readme_example():
    quantizer = FSQ(levels=[8, 5, 5, 5])
    x = torch.randn(1, 1024, 4)
    xhat, indices = quantizer(x)
    assert xhat.shape == (1, 1024, 4) and indices.shape == (1, 1024)
    assert torch.all(xhat == quantizer.indices_to_codes(indices))


def test_model_shape_contract():
    fsq = FSQ([8, 5, 5, 5], dim=32)
    x = torch.randn(3, 7, 32)
    out = fsq(x)
    assert out.quantized.shape == x.shape and out.indices.shape == (3, 7)
    assert out.indices.dtype == torch.int64
    assert torch.allclose(fsq.indices_to_codes(out.indices), out.quantized, atol=1e-6)


@pytest.mark.parametrize("dim, num_codebooks, shape", [
    (6, 1, (2, 6, 3, 3)),  # projections, batch of images
    (6, 1, (1, 6, 4, 5)),  # one image
    (2, 1, (3, 2, 7)),  # no projections
    (4, 2, (2, 4, 5)),  # two codebooks, no projections
    (7, 2, (2, 7, 2, 3)),  # two codebooks with projections
    (6, 1, (2, 9, 6)),  # a channels-last sequence
])
def test_latent_quantize_gradients_match_autograd_on_the_paper_losses(dim, num_codebooks,
                                                                      shape):
    torch.manual_seed(0)
    lq = LatentQuantize([5, 4], dim=dim, commitment_loss_weight=0.3,
                        quantization_loss_weight=0.7, num_codebooks=num_codebooks).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(*shape, dtype=torch.float64)
    out, indices, loss = lq(x)
    ((out * weight).sum() + loss).backward()
    ours = [x.grad] + [p.grad.clone() for p in lq.parameters()]

    # textbook: straight-through to z, ||z - sg(q)||^2 and ||sg(z) - q||^2
    lq.zero_grad()
    x_ref = x.detach().clone().requires_grad_()
    channel_first = shape[1] == dim
    rows = x_ref.flatten(2).transpose(1, 2) if channel_first else x_ref
    z = lq.project_in(rows).unflatten(-1, (num_codebooks, 2))
    values = list(lq.values_per_latent)
    nearest = [(z[..., i, None] - values[i].detach()).abs().argmin(-1) for i in range(2)]
    ref_indices = nearest[0] + 5 * nearest[1]
    assert torch.equal(indices.reshape(ref_indices.shape), ref_indices)
    q = torch.stack([values[i][nearest[i]] for i in range(2)], -1)
    codes = (z + (q - z).detach()).flatten(-2)
    ref_out = lq.project_out(codes)
    ref_out = ref_out.transpose(1, 2).reshape(x.shape) if channel_first else ref_out
    ref_loss = 0.3 * ((z - q.detach()) ** 2).mean() + 0.7 * ((z.detach() - q) ** 2).mean()
    assert torch.allclose(loss, ref_loss)
    ((ref_out * weight).sum() + ref_loss).backward()
    reference = [x_ref.grad] + [p.grad for p in lq.parameters()]
    for a, b in zip(ours, reference, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def textbook_fsp(fsp: FSP, x: torch.Tensor, rate: float):
    """FSP written out with autograd: moment loss, CDF, straight-through bins, perturbation."""
    if fsp.channel_first:
        out, loss = textbook_fsp_rows(fsp, x.movedim(1, -1), rate)
        return out.movedim(-1, 1), loss
    return textbook_fsp_rows(fsp, x, rate)


def textbook_fsp_rows(fsp: FSP, x: torch.Tensor, rate: float):
    h = fsp.project_in(x.reshape(-1, fsp.dim))
    variance, mean = torch.var_mean(h, dim=0)
    std = variance.sqrt().clamp_min(1e-8)
    u = (h - mean) / std
    norm = fsp.vector_norm
    loss = (norm.l1_weight * ((mean - norm.l1_target) ** 2).mean()
            + norm.l2_weight * ((variance - norm.l2_target) ** 2).mean()
            + norm.l3_weight * (((u ** 3).mean(0) - norm.l3_target) ** 2).mean()
            + norm.l4_weight * (((u ** 4).mean(0) - 3.0 - norm.l4_target) ** 2).mean())
    act = fsp.act_func(h)
    levels = torch.tensor(fsp._levels.tolist(), dtype=h.dtype)
    eps = torch.finfo(h.dtype).eps
    centre = ((act.clamp_max(1 - eps) * levels).floor() + 0.5) / levels
    q_act = act + (centre - act).detach()
    if rate < 1.0:
        proposal = act + (torch.rand_like(act) * 2 - 1) / (2 * levels)
        perturbed = torch.where((proposal > 0) & (proposal < 1), proposal, act)
        q_act = torch.where(torch.rand_like(act) > rate, perturbed, q_act)
    if fsp.need_inv_act:
        q = h + (fsp.inv_act_func(q_act.clamp(eps, 1 - eps)) - h).detach()
    else:
        q = (q_act - 0.5) * 12 ** 0.5
    return fsp.project_out(q).reshape(x.shape), loss


@pytest.mark.parametrize("act_name", ["tanh", "sigmoid", "normal", "laplace", "cauchy"])
@pytest.mark.parametrize("options", [
    dict(vector_norm="kurt", quantize_rate=0.5),
    dict(vector_norm="var", dim=6, quantize_rate=1.0),
    dict(vector_norm="kurt", dim=6, need_inv_act=True, quantize_rate=0.3),
    dict(vector_norm="none", quantize_rate=0.0),
    dict(vector_norm="kurt", dim=6, channel_first=True, quantize_rate=0.5),
])
def test_fsp_fused_backward_matches_autograd_on_the_textbook_expression(act_name, options):
    torch.manual_seed(0)
    fsp = FSP([8, 5, 3], act_name=act_name, **options).double().train()
    dim = fsp.dim
    shape = (3, dim, 5, 8) if fsp.channel_first else (3, 40, dim)
    x = (torch.randn(*shape, dtype=torch.float64) * 1.5 + 0.2).requires_grad_()
    weight = torch.randn(*shape, dtype=torch.float64)
    torch.manual_seed(1)
    out, _, loss, info = fsp(x)
    ((out * weight).sum() + 3.0 * loss).backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in fsp.parameters()]

    fsp.zero_grad()
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    ref_out, ref_loss = textbook_fsp(fsp, x_ref, options["quantize_rate"])
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    ((ref_out * weight).sum() + 3.0 * ref_loss).backward()
    reference = [x_ref.grad] + [p.grad for p in fsp.parameters()]
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the statistics are reported as the batch's own
    rows = x.detach().movedim(1, -1) if fsp.channel_first else x.detach()
    h = fsp.project_in(rows.reshape(-1, dim)).detach().numpy()
    np.testing.assert_allclose(info["norm_info"]["variance"].numpy(), h.var(0, ddof=1))
    z = (h - h.mean(0)) / h.std(0, ddof=1)
    np.testing.assert_allclose(info["norm_info"]["kurtosis"].numpy(), (z ** 4).mean(0) - 3)


def test_fsp_moment_loss_gradient_with_a_constant_channel_is_finite():
    fsp = FSP([4, 4], vector_norm="kurt").double().train()
    x = torch.randn(1, 30, 2, dtype=torch.float64)
    x[..., 1] = 0.7  # std clamped: no gradient through it
    x.requires_grad_()
    out, _, loss, _ = fsp(x)
    (out.sum() + loss).backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fsp_half_input_gradient_is_the_float32_one_rounded(dtype):
    fsp = FSP([8, 5, 5, 5], act_name="tanh", vector_norm="kurt", quantize_rate=1.0).train()
    x = torch.randn(2, 50, 4).to(dtype)
    half = x.clone().requires_grad_()
    out, indices, loss, _ = fsp(half)
    (out.float().sum() + loss).backward()
    full = x.float().requires_grad_()
    out_f, indices_f, loss_f, _ = fsp(full)
    (out_f.sum() + loss_f).backward()
    assert out.dtype == dtype and half.grad.dtype == dtype and loss.dtype == torch.float32
    assert torch.equal(indices, indices_f) and torch.equal(loss, loss_f)
    assert torch.equal(half.grad, full.grad.to(dtype))


def test_latent_quantize_refuses_non_finite_channel_first_input_in_both_modes():
    lq = LatentQuantize([5, 5, 8], dim=6)
    x = torch.randn(2, 6, 4, 4)
    x[1, 3, 2, 0] = float("inf")
    for training in (True, False):
        with pytest.raises(QuantizerInputError, match="non-finite"):
            lq.train(training)(x)


def test_latent_quantize_loss_weight_buffers_are_read_when_changed():
    lq = LatentQuantize([5, 4], dim=2, commitment_loss_weight=0.1,
                        quantization_loss_weight=0.1)
    x = torch.randn(2, 2, 9)
    loss = lq(x).loss
    lq.commitment_loss_weight.fill_(0.5)  # in place
    assert torch.allclose(lq(x).loss, loss * 3.0)
    lq.quantization_loss_weight = torch.tensor(0.0)  # replaced
    assert torch.allclose(lq(x).loss, loss * 2.5)


@pytest.mark.parametrize("training", [True, False])
def test_fsp_channel_first_projected_refuses_non_finite(training):
    fsp = FSP([8, 5, 5, 5], dim=8, channel_first=True).train(training)
    x = torch.randn(2, 8, 3, 3)
    x[0, 5, 1, 2] = float("nan")
    with pytest.raises(QuantizerInputError, match="non-finite"):
        fsp(x)


@pytest.mark.parametrize("rows", [2048, 4099])  # a cut into equal slabs, and rows left over
def test_narrow_outer_split_over_threads_is_the_product(rows):
    from vqvae.quantizers.narrow_linear import narrow_outer

    torch.manual_seed(0)
    a, b = torch.randn(rows, 5), torch.randn(rows, 33)
    expected = a.double().t() @ b.double()
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            got = narrow_outer(a, b)
            assert got.shape == (5, 33)
            assert torch.allclose(got.double(), expected, atol=1e-3, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("options", [{"preserve_symmetry": True}, {"bound_hard_clamp": True},
                                     {}])
def test_projected_fsq_gathered_rows_decode_from_their_indices(options):
    """With many rows per code the output rows are gathered from the projected codes; each must
    be project_out of its own code (codes built by enumerating the digits in NumPy), and the
    straight-through gradient must not depend on which path ran."""
    torch.manual_seed(4)
    fsq = FSQ([4, 3, 5], dim=7, **options).double()
    x = (torch.randn(3, 200, 7, dtype=torch.float64) * 1.5).requires_grad_()  # 600 rows, 60 codes
    out, indices = fsq(x)
    codes = np_codes_of_all_indices([4, 3, 5], options.get("preserve_symmetry", False))
    w_out = fsq.project_out.weight.detach().numpy()
    expected = codes[indices.numpy()] @ w_out.T + fsq.project_out.bias.detach().numpy()
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=1e-12)
    # decoding the indices gives the output's very bits, in float32 too
    assert torch.equal(fsq.indices_to_codes(indices), out)
    fsq32 = FSQ([4, 3, 5], dim=7, **options)
    x32 = x.detach().float()
    out32, indices32 = fsq32(x32)
    assert torch.equal(fsq32.indices_to_codes(indices32), out32)
    # out-of-range indices wrap around, as the digit arithmetic of the per-row path does
    assert torch.equal(fsq32.indices_to_codes(indices32 + 60), out32)
    assert torch.equal(fsq32.indices_to_codes(indices32[:, :5] + 60),
                       fsq32.indices_to_codes(indices32[:, :5]))
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    # the same rows in chunks too small for the gather (10 rows < 4 per code) give the same
    grads = torch.cat([torch.autograd.grad((fsq(chunk)[0] * w).sum(), chunk)[0]
                       for chunk, w in zip(x.detach().split(1, 1), weight.split(1, 1),
                                           strict=True)
                       for chunk in [chunk.requires_grad_()]], 1)
    torch.testing.assert_close(x.grad, grads, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("hard_clamp", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_projected_fsq_gathered_gradients_every_bound(symmetric, hard_clamp, bias):
    """The gathered projected call (many rows per code) for each bound and with or without
    projection biases: every gradient against autograd on the textbook continuous bound, in
    float64, with the straight-through values taken from the unprojected bound."""
    levels = [4, 3] if symmetric else [5, 3]
    torch.manual_seed(5)
    fsq = FSQ(levels, dim=6, preserve_symmetry=symmetric, bound_hard_clamp=hard_clamp,
              projection_has_bias=bias).double()
    x = (torch.randn(2, 200, 6, dtype=torch.float64) * 1.5).requires_grad_()
    weight = torch.randn(2, 200, 6, dtype=torch.float64)
    out, indices = fsq(x)
    (out * weight).sum().backward()

    ref = FSQ(levels, dim=6, preserve_symmetry=symmetric, bound_hard_clamp=hard_clamp,
              projection_has_bias=bias).double()
    ref.load_state_dict(fsq.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    h = ref.project_in(x_ref)
    lv = torch.tensor(levels, dtype=torch.float64)
    act = (lambda v: v.clamp(-1, 1)) if hard_clamp else torch.tanh
    if symmetric:  # code = (L-1)(t+1)/2 rounded, times 2/(L-1), minus 1: slope 1 in t
        continuous = act(h)
    else:
        half_l = (lv - 1) * (1 + EPS) / 2
        offset = (lv % 2 == 0).double() * 0.5
        shift = offset / half_l if hard_clamp else torch.atanh(offset / half_l)
        continuous = (act(h + shift) * half_l - offset) / (lv // 2)
    codes = ref.quantize(h.detach())
    straight = continuous + (codes - continuous).detach()
    expected = ref.project_out(straight)
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.equal(indices, ref.codes_to_indices(codes))
    (expected * weight).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-10)
    for ours, textbook in zip(fsq.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(ours.grad, textbook.grad, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("features", [(40, 3), (3, 40)])  # narrowing, widening
@pytest.mark.parametrize("bias", [True, False])
def test_narrow_linear_gradients_are_linears(features, bias):
    """narrow_linear's own backward (its operand orders, and the bias gradient taken from the
    weight gradient's product when the input is the narrow side) against nn.Linear's autograd
    in float64."""
    from vqvae.quantizers.narrow_linear import narrow_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(*features, bias=bias).double()
    x = torch.randn(3, 1500, features[0], dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1500, features[1], dtype=torch.float64)
    (narrow_linear(x, layer) * weight).sum().backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]
    x.grad = None
    layer.zero_grad(set_to_none=True)
    (layer(x) * weight).sum().backward()
    expected = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)
