"""The quantizer registry: a new quantizer is one registration, and everything reads it."""

import math

import pytest
import torch
from torch import nn

from vqvae import registry
from vqvae.cli import build_parser
from vqvae.models import VQVAE, ModelConfig
from vqvae.quantizers import VQOutput
from vqvae.train import TrainConfig, evaluate, make_optimizer, train_step


class Levels(nn.Module):
    """A toy quantizer with no codebook: each of the last axis's ``dim`` entries rounded to one
    of ``levels`` values in [-1, 1]; one index per position, ``levels ** dim`` values."""

    def __init__(self, dim: int, levels: int):
        super().__init__()
        self.dim, self.levels = dim, levels

    def forward(self, x):
        steps = ((torch.tanh(x) + 1) / 2 * (self.levels - 1)).round()  # (..., dim)
        q = steps / (self.levels - 1) * 2 - 1
        quantized = x + (q - x).detach()
        digits = self.levels ** torch.arange(self.dim, device=x.device)
        indices = (steps.long() * digits).sum(-1)
        return VQOutput(quantized, indices, x.new_zeros(()))

    def decode(self, indices):
        digits = self.levels ** torch.arange(self.dim, device=indices.device)
        steps = indices.unsqueeze(-1) // digits % self.levels
        return steps.float() / (self.levels - 1) * 2 - 1


@pytest.fixture
def toy_levels():
    @registry.register("toy-levels", help="a test quantizer", defaults={"levels": 3},
                       codes=lambda config: config.quantizer_options["levels"]
                       ** config.vector_dim)
    def build(dim, codebook_size, options):
        return Levels(dim, **options)

    yield "toy-levels"
    del registry._ENTRIES["toy-levels"]


def test_a_registered_quantizer_is_built_trained_and_offered_by_the_cli(toy_levels):
    config = ModelConfig(quantizer=toy_levels, vector_dim=2, num_embeddings=4, hidden_dim=8)
    assert config.vocab_size == 9 and config.code_shape == (4,)
    assert config.bits_per_image == pytest.approx(4 * math.log2(9))
    torch.manual_seed(0)
    model = VQVAE(config)
    images = torch.rand(6, 1, 28, 28)
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    out = train_step(model, optimizer, images)
    assert out.indices.shape == (6, 4) and int(out.indices.max()) < 9
    assert evaluate(model, images)["used_codes"] >= 1
    codes = model.encode(images)
    assert torch.equal(model.decode(codes), model.decoder(model.quantizer.decode(codes)))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 9\)"):
        model.decode(torch.full((1, 4), 9))
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    quantizer = next(a for a in train._actions if a.dest == "quantizer")
    assert toy_levels in quantizer.choices and "toy-levels: a test quantizer" in quantizer.help


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("ours", help="again")(lambda d, k, o: nn.Identity())
    with pytest.raises(ValueError, match="one non-empty line"):
        registry.register("x-bad", help="two\nlines")
    with pytest.raises(ValueError, match="layout settings"):
        registry.register("x-bad", help="h", layout=("depth",))
    with pytest.raises(ValueError, match="unknown quantizer 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="unknown quantizer"):
        ModelConfig(quantizer="nope")


def test_layouts_say_the_code_shape_and_bits():
    """What CODE_AXES held: the registry's layouts, and bits = positions · depths · log2(K)."""
    expected = {"ours": (), "naive": (), "lucidrains": (), "rvq": (3,), "rqvae": (3,),
                "lucidrains-rvq": (3,), "grvq": (2, 3), "lucidrains-grvq": (2, 3),
                "lfq": (), "lucidrains-lfq": (), "simvq": (), "lucidrains-simvq": (),
                "rlfq": (3,), "rsimvq": (3,), "grlfq": (2, 3)}
    levels = {"fsq", "lucidrains-fsq", "latent", "rfsq", "grfsq"}  # K from levels (own test)
    assert set(registry.names()) == set(expected) | levels
    for name, axes in expected.items():
        extra = {"num_quantizers": 3} if axes else {}
        if len(axes) == 2:
            extra["groups"] = 2
        config = ModelConfig(quantizer=name, codebook_size=32, **extra)
        assert config.code_shape == (16, *axes), name
        assert config.bits_per_image == 16 * math.prod(axes) * 5, name


def test_none_is_the_identity_with_no_information():
    config = ModelConfig(quantizer="none", hidden_dim=8)
    assert "none" not in registry.names() and "none" in registry.names(listed_only=False)
    assert config.bits_per_image == 0 and config.vocab_size == 1
    model = VQVAE(config)
    assert not list(model.quantizer.parameters())
    z = torch.randn(3, 16, 16, requires_grad=True)
    quantized, indices, loss = model.quantizer(z)
    assert quantized is z and float(loss) == 0.0
    assert torch.equal(indices, torch.zeros(3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="no codes"):
        model.decode(indices)
    with pytest.raises(ValueError, match="takes no options"):
        VQVAE(ModelConfig(quantizer="none", quantizer_options={"decay": 0.9}))
