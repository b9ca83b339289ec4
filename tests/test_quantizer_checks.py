"""The argument checks of the quantizers: each names the argument and what it expected."""

import math

import pytest
import torch

from vqvae.quantizers import VectorQuantize
from vqvae.quantizers.checks import (
    QuantizerInputError,
    check_not_meta,
    check_optional_probability,
    check_positive_int,
)


@pytest.mark.parametrize("value", [1, 7, 2**40])
def test_positive_int_takes_positive_ints(value):
    check_positive_int("codebook_size", value)


@pytest.mark.parametrize("value", [0, -3, True, False, 2.0, "8", None, torch.tensor(8)])
def test_positive_int_refuses_everything_else(value):
    with pytest.raises(QuantizerInputError, match="codebook_size") as caught:
        check_positive_int("codebook_size", value)
    assert "positive int" in str(caught.value)


@pytest.mark.parametrize("value", [None, 0.0, 0.5, 0.99, 0])
def test_probability_takes_numbers_in_the_interval(value):
    check_optional_probability("decay", value)


@pytest.mark.parametrize("value", ["0.8", 1.0, -0.1, math.nan, math.inf, True, [0.8]])
def test_probability_refuses_everything_else(value):
    with pytest.raises(QuantizerInputError, match="decay"):
        check_optional_probability("decay", value)


def test_meta_device_is_refused_with_its_name():
    check_not_meta("VectorQuantize")
    with torch.device("meta"), pytest.raises(QuantizerInputError, match="meta"):
        check_not_meta("VectorQuantize")


@pytest.mark.parametrize("kwargs, name", [
    ({"codebook_size": True}, "codebook_size"),
    ({"codebook_size": 8.0}, "codebook_size"),
    ({"dim": "4"}, "dim"),
    ({"decay": "0.8"}, "decay"),
    ({"decay": 1.5}, "decay"),
    ({"decay": math.nan}, "decay"),
])
def test_vector_quantize_names_the_bad_argument(kwargs, name):
    arguments = {"dim": 4, "codebook_size": 8, **kwargs}
    with pytest.raises(QuantizerInputError, match=name):
        VectorQuantize(**arguments)


def test_vector_quantize_is_not_built_on_the_meta_device():
    with torch.device("meta"), pytest.raises(QuantizerInputError, match="meta"):
        VectorQuantize(dim=4, codebook_size=8)


@pytest.mark.parametrize("scale", [1e30, 1e20])
def test_values_too_large_to_square_change_nothing(scale):
    """Finite values whose squared distances overflow float32 are refused like NaN: before,
    a batch of 1e30s gave an infinite loss and moved a code to about 1e29."""
    from vqvae import VectorQuantize
    from vqvae.quantizers import QuantizerInputError

    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=16, decay=0.8)
    vq(torch.randn(2, 32, 8))  # one ordinary step first
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    x = torch.randn(2, 32, 8) * scale
    assert torch.isfinite(x).all()
    with pytest.raises(QuantizerInputError, match="too large"):
        vq(x)
    after = vq.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_residual_stack_refuses_values_too_large_to_square():
    from vqvae import ResidualVQ
    from vqvae.quantizers import QuantizerInputError

    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, codebook_size=16, num_quantizers=3, decay=0.8)
    rvq(torch.randn(2, 32, 8))
    before = {k: v.clone() for k, v in rvq.state_dict().items()}
    with pytest.raises(QuantizerInputError, match="too large"):
        rvq(torch.randn(2, 32, 8) * 1e30)
    assert all(torch.equal(before[k], v) for k, v in rvq.state_dict().items())
