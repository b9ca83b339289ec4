"""The conv model on images of any size and channel count; the 28×28 gray model unchanged."""

import pytest
import torch
from torch import nn

from vqvae.models import VQVAE, ConvDecoder, ConvEncoder, ModelConfig, ResidualBlock


class OldEncoder(nn.Module):
    """The conv encoder as it was before it took channels_in, layer for layer."""

    def __init__(self, config):
        super().__init__()
        c = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c // 2, c, 4, stride=2, padding=1),
            ResidualBlock(c), nn.ReLU(),
            nn.Conv2d(c, config.vector_dim, 1),
        )

    def forward(self, images):
        return self.body(images).permute(0, 2, 3, 1)


class OldDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(config.vector_dim, c, 3, padding=1),
            ResidualBlock(c), nn.ReLU(),
            nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c // 2, 1, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )
        nn.init.constant_(self.body[-2].bias, -2.0)

    def forward(self, quantized):
        return self.body(quantized.permute(0, 3, 1, 2))


def test_gray_28_model_is_unchanged(one_thread):
    config = ModelConfig(model="conv", channels=8, codebook_size=32)
    assert config.channels_in == 1
    torch.manual_seed(0)
    new = nn.ModuleList([ConvEncoder(config), ConvDecoder(config)])
    torch.manual_seed(0)
    old = nn.ModuleList([OldEncoder(config), OldDecoder(config)])
    new_state, old_state = new.state_dict(), old.state_dict()
    assert list(new_state) == list(old_state)
    for key in old_state:
        assert torch.equal(new_state[key], old_state[key]), key
    images = torch.rand(3, 1, 28, 28)
    z = new[0](images)
    assert z.shape == (3, 7, 7, 16) and torch.equal(z, old[0](images))
    assert torch.equal(new[1](z), old[1](z))
    # a checkpoint's config from before channels_in existed
    saved = {k: v for k, v in config.to_dict().items() if k != "channels_in"}
    model = VQVAE(ModelConfig.from_dict(saved))
    reference = VQVAE(config)
    model.load_state_dict(reference.state_dict())  # strict: same names and shapes


@pytest.mark.parametrize("channels_in, size", [(3, 32), (3, 16), (1, 20), (4, 8)])
def test_any_size_and_channels(channels_in, size, one_thread):
    config = ModelConfig(model="conv", channels=8, codebook_size=32, image_size=size,
                         channels_in=channels_in)
    model = VQVAE(config)
    images = torch.rand(2, channels_in, size, size)
    with torch.no_grad():
        out = model(images)
    assert out.reconstruction.shape == images.shape
    assert out.indices.shape == (2, size // 4, size // 4) == (2, *config.code_shape)
    assert 0 <= float(out.reconstruction.min()) and float(out.reconstruction.max()) <= 1
    model.eval()
    assert model.decode(model.encode(images)).shape == images.shape
    # fully convolutional: a non-square image of multiples of 4 works too
    wide = model(torch.rand(1, channels_in, size, size + 8))
    assert wide.reconstruction.shape == (1, channels_in, size, size + 8)


def test_colour_model_learns(one_thread):
    torch.manual_seed(0)
    config = ModelConfig(model="conv", channels=8, codebook_size=32, image_size=16,
                         channels_in=3)
    model = VQVAE(config)
    # smooth colour images: a random colour per 4×4 block
    images = torch.rand(8, 3, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(images)
        loss = (out.reconstruction - images).square().mean()
        optimizer.zero_grad()
        (loss + out.vq_loss).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_bad_images_get_a_clear_error():
    model = VQVAE(ModelConfig(model="conv", channels=8, codebook_size=32, image_size=32,
                              channels_in=3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*got shape \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"multiples of 4 .* got 30×32"):
        model(torch.rand(2, 3, 30, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(2, 3, 0, 32))
    with pytest.raises(ValueError, match=r"got shape \(3, 32, 32\)"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="float images"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_config_checks_channels_in():
    with pytest.raises(ValueError, match="channels_in must be a positive integer"):
        ModelConfig(model="conv", channels_in=0)
    with pytest.raises(ValueError, match="needs model='conv'"):
        ModelConfig(model="mlp", channels_in=3)
    config = ModelConfig(model="conv", channels_in=3, image_size=32)
    assert ModelConfig.from_dict(config.to_dict()) == config
