"""Every quantizer on the conv model's grid of codes, the library's included, and the conv
model's presets."""

import pytest
import torch

from vqvae import registry
from vqvae.models import VQVAE, ModelConfig
from vqvae.zoo import CONV_DEFAULTS, OURS_DEFAULTS

LIBRARY = [("lucidrains", {}), ("lucidrains-rvq", {"num_quantizers": 3}),
           ("lucidrains-grvq", {"num_quantizers": 2, "groups": 2})]


def _build(name: str, layout: dict, seed: int = 1):
    entry = registry.get(name)
    torch.manual_seed(seed)
    return entry.build(8, 16, {**entry.defaults, **layout})


@pytest.mark.parametrize("name,layout", LIBRARY)
def test_library_quantizers_take_a_grid(name, layout, one_thread):
    """On ``(B, 5, 3, D)`` the adapter gives what the library's own layer gives on the same
    vectors laid out as a sequence ``(B, 15, D)``, in the grid's shape."""
    from vector_quantize_pytorch import GroupedResidualVQ, ResidualVQ, VectorQuantize

    x = torch.randn(4, 5, 3, 8)
    ours = _build(name, layout).train()
    library_class = {"lucidrains": VectorQuantize, "lucidrains-rvq": ResidualVQ,
                     "lucidrains-grvq": GroupedResidualVQ}[name]
    options = {**registry.get(name).defaults, **layout}
    if name != "lucidrains":  # the residual presets divide the commitment by the depth
        options["commitment_weight"] = 0.04 / layout["num_quantizers"]
    torch.manual_seed(1)
    library = library_class(dim=8, codebook_size=16, **options).train()
    quantized, indices, loss = ours(x)
    expected_q, expected_i, expected_loss = library(x.reshape(4, 15, 8))
    if name == "lucidrains-grvq":  # the library puts groups first
        expected_i = expected_i.movedim(0, -2)
    axes = {"lucidrains": (), "lucidrains-rvq": (3,), "lucidrains-grvq": (2, 2)}[name]
    assert quantized.shape == x.shape
    assert indices.shape == (4, 5, 3, *axes)
    assert torch.equal(quantized, expected_q.reshape(x.shape))
    assert torch.equal(indices, expected_i.reshape(indices.shape))
    assert torch.allclose(loss, expected_loss.mean())
    # Position (b, h, w) of the grid is position h·3 + w of the sequence
    assert torch.equal(indices[2, 4, 1], expected_i[2, 4 * 3 + 1])


@pytest.mark.parametrize("name,layout", LIBRARY)
def test_library_decode_inverts_encode_on_a_grid(name, layout, one_thread):
    quantizer = _build(name, layout).train()
    x = torch.randn(6, 4, 4, 8)
    quantizer(x)  # initialise (k-means when asked)
    quantizer.eval()
    with torch.no_grad():
        quantized, indices, _ = quantizer(x)
        decoded = quantizer.decode(indices)
    assert decoded.shape == x.shape
    assert torch.allclose(decoded, quantized, atol=1e-5)
    # The MLP's (B, positions, D) still goes through unchanged
    with torch.no_grad():
        out = quantizer(torch.randn(3, 16, 8))
    assert out.indices.shape[:2] == (3, 16)
    assert torch.allclose(quantizer.decode(out.indices), out.quantized, atol=1e-5)


@pytest.mark.parametrize("name", ["ours", "rvq", "grvq", "naive", "lucidrains",
                                  "lucidrains-rvq", "lucidrains-grvq"])
def test_every_quantizer_trains_the_conv_model(name, one_thread):
    """A few optimiser steps of the conv model on colour images: the loss is finite and the
    weights move, and the codes come back in the model's code shape."""
    layout = {"num_quantizers": 2} if "rvq" in name else {}
    if "grvq" in name:
        layout["groups"] = 2
    config = ModelConfig(model="conv", quantizer=name, image_size=16, channels_in=3,
                         channels=8, vector_dim=8, codebook_size=16, **layout)
    torch.manual_seed(0)
    model = VQVAE(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(8, 3, 16, 16)
    before = model.encoder.body[0].weight.clone()
    for _ in range(3):
        reconstruction, indices, vq_loss = model(images)
        loss = torch.nn.functional.mse_loss(reconstruction, images) + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert indices.shape == (8, *config.code_shape)
    assert not torch.equal(before, model.encoder.body[0].weight)
    codes = model.encode(images)
    assert model.decode(codes).shape == images.shape


def test_conv_presets():
    ours = ModelConfig(model="conv", quantizer="ours").quantizer_options
    assert ours == {**OURS_DEFAULTS, **CONV_DEFAULTS}
    assert ours["kmeans_init"] is True and ours["dead_code_warmup_steps"] == 100
    # The MLP keeps its own, and options asked for win over the preset
    assert ModelConfig(quantizer="ours").quantizer_options == OURS_DEFAULTS
    asked = ModelConfig(model="conv", quantizer="rvq", num_quantizers=2,
                        quantizer_options={"kmeans_init": False}).quantizer_options
    assert asked["kmeans_init"] is False and asked["dead_code_warmup_steps"] == 100
    assert ModelConfig(model="conv", quantizer="lucidrains-rvq").quantizer_options[
        "kmeans_init"] is True
    assert ModelConfig(model="conv", quantizer="lucidrains").quantizer_options == \
        registry.get("lucidrains").defaults


def test_model_defaults_of_an_entry():
    entry = registry.get("ours")
    assert entry.defaults_for("mlp") == dict(entry.defaults)
    assert entry.defaults_for("conv")["dead_code_warmup_steps"] == 100
    assert entry.defaults["dead_code_warmup_steps"] == 1000  # not changed by the look-up
