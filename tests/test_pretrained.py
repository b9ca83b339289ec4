"""save_pretrained / from_pretrained: safetensors + JSON, bit-identical weights, no pickle."""

import dataclasses
import json

import pytest
import torch
from conftest import forbid_pickle, requires_mnist
from safetensors.torch import load_file
from torch import nn

from vqvae.models import VQVAE, ModelConfig
from vqvae.pretrained import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin
from vqvae.rundir import load_model, read_config, save_config
from vqvae.train import TrainConfig, train


def _trained(config: ModelConfig) -> VQVAE:
    """A model whose weights and quantizer buffers have moved away from their initial values."""
    torch.manual_seed(0)
    model = VQVAE(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.rand(32, 1, config.image_size, config.image_size)
    for _ in range(3):
        reconstruction, _, vq_loss = model(images)
        loss = (reconstruction - images).pow(2).mean() + vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


CASES = {
    "mlp-ours": ModelConfig(),
    "conv-ours": ModelConfig(model="conv", channels=8, vector_dim=4, codebook_size=32),
    "mlp-rvq": ModelConfig(quantizer="rvq", num_quantizers=3, codebook_size=64),
    "conv-grvq": ModelConfig(model="conv", channels=8, vector_dim=4, codebook_size=32,
                             quantizer="grvq", groups=2, num_quantizers=2),
    "mlp-rqvae": ModelConfig(quantizer="rqvae", num_quantizers=2, codebook_size=64),
    "mlp-lucidrains": ModelConfig(quantizer="lucidrains", codebook_size=64),
    "mlp-naive": ModelConfig(quantizer="naive", codebook_size=64),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_bit_identical_and_pickle_free(name, tmp_path, monkeypatch):
    config = CASES[name]
    model = _trained(config)
    model.save_pretrained(tmp_path)
    state = model.state_dict()

    # The weights file alone, read by safetensors: exactly the state_dict
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors.keys() == state.keys()
    for key, value in state.items():
        assert tensors[key].dtype == value.dtype, key
        assert torch.equal(tensors[key], value), key
    assert json.loads((tmp_path / CONFIG_NAME).read_text()) == {"model": config.to_dict()}

    # A fresh model under another seed differs, so equality below comes from the file
    torch.manual_seed(1)
    assert not all(torch.equal(v, state[k]) for k, v in VQVAE(config).state_dict().items())
    forbid_pickle(monkeypatch)
    loaded = VQVAE.from_pretrained(tmp_path, device="cpu")
    monkeypatch.undo()

    assert not loaded.training
    assert loaded.config == config
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    images = torch.rand(8, 1, config.image_size, config.image_size, generator=torch.Generator()
                        .manual_seed(2))
    with torch.no_grad():
        expected, got = model(images), loaded(images)
    assert torch.equal(got.reconstruction, expected.reconstruction)
    assert torch.equal(got.indices, expected.indices)
    assert torch.equal(got.vq_loss, expected.vq_loss)
    assert torch.equal(loaded.decode(got.indices), model.decode(expected.indices))


def test_run_directory_config_is_kept_and_read(tmp_path):
    """A run directory's config.json (``save_config``) is the pretrained config: saving weights
    there leaves it byte for byte, and the run still resumes from the same settings."""
    model_config = CASES["mlp-rvq"]
    train_config = TrainConfig(epochs=3, out_dir=str(tmp_path))
    save_config(tmp_path, train_config, model_config)
    before = (tmp_path / CONFIG_NAME).read_bytes()
    model = _trained(model_config)
    model.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_bytes() == before
    assert read_config(tmp_path) == (train_config, model_config)
    loaded = VQVAE.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@requires_mnist
def test_from_a_trained_run(tmp_path):
    run = train(TrainConfig(epochs=1, train_subset=512, test_subset=256, out_dir=str(tmp_path),
                            progress=False, precision="fp32"),
                ModelConfig(codebook_size=64))
    run.model.save_pretrained(run.run_dir)
    from_checkpoint = load_model(run.run_dir)
    loaded = VQVAE.from_pretrained(run.run_dir)
    for key, value in from_checkpoint.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_another_model_in_config_is_refused(tmp_path):
    VQVAE(ModelConfig(codebook_size=64)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="describes another model"):
        VQVAE(ModelConfig(codebook_size=32)).save_pretrained(tmp_path)
    # The refused save wrote nothing: the first model still loads
    assert VQVAE.from_pretrained(tmp_path).config.codebook_size == 64


def test_weights_that_do_not_match_the_config(tmp_path):
    VQVAE(ModelConfig(codebook_size=64)).save_pretrained(tmp_path)
    values = json.loads((tmp_path / CONFIG_NAME).read_text())
    values["model"]["quantizer"] = "rvq"
    values["model"]["num_quantizers"] = 2
    values["model"]["quantizer_options"] = {}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(values))
    with pytest.raises(ValueError, match="does not match the config"):
        VQVAE.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        VQVAE.from_pretrained(tmp_path)
    save_config(tmp_path, TrainConfig(), ModelConfig())
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        VQVAE.from_pretrained(tmp_path)


@dataclasses.dataclass
class TiedConfig:
    width: int = 4

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        return cls(**values)


class Tied(PretrainedMixin, nn.Module):
    """Two names for one weight, and a buffer that is a non-contiguous view of another."""

    def __init__(self, config: TiedConfig):
        super().__init__()
        self.config = config
        self.first = nn.Linear(config.width, config.width, bias=False)
        self.second = nn.Linear(config.width, config.width, bias=False)
        self.second.weight = self.first.weight
        table = torch.randn(config.width, 2 * config.width)
        self.register_buffer("table", table)
        self.register_buffer("table_t", table.t()[::2])  # strided view into `table`

    def forward(self, x):
        return self.second(self.first(x)) + self.table_t.sum()


def test_shared_and_strided_tensors(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Tied(TiedConfig(width=6))
    assert model.state_dict()["first.weight"].data_ptr() == \
        model.state_dict()["second.weight"].data_ptr()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    for key, value in model.state_dict().items():
        assert torch.equal(tensors[key], value), key
    torch.manual_seed(1)
    forbid_pickle(monkeypatch)
    loaded = Tied.from_pretrained(tmp_path)
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), model(x))
    # Still tied after loading: one parameter object under both names
    assert loaded.first.weight is loaded.second.weight


def test_a_class_without_a_config_type_is_told_what_it_needs(tmp_path):
    class Bare(PretrainedMixin, nn.Module):
        def __init__(self, width):
            super().__init__()

    with pytest.raises(TypeError, match="config_class"):
        Bare._config_type()


def test_a_config_json_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        VQVAE(ModelConfig(codebook_size=64)).save_pretrained(tmp_path)
    assert not (tmp_path / WEIGHTS_NAME).exists()
