"""Exported programs (ONNX through onnxruntime, torch.export archives) against the eager model:
the same codes, images within 1e-5, any batch size from one file."""

import json

import numpy as np
import pytest
import torch
from conftest import requires_mnist

from vqvae.export import (
    DirectProgram,
    GroupedResidualProgram,
    ResidualProgram,
    VectorQuantizeProgram,
    export_model,
    quantizer_program,
    register_program,
)
from vqvae.models import VQVAE, ModelConfig
from vqvae.quantizers import VQOutput

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BATCHES = (1, 3, 8)
TOLERANCE = 1e-5

#: Each of our quantizers with the layout settings it takes
QUANTIZERS = {
    "ours": {},
    "rvq": {"num_quantizers": 3},
    "rqvae": {"num_quantizers": 2},
    "grvq": {"groups": 2, "num_quantizers": 2},
}


def tiny_model(model: str, quantizer: str, seed: int = 0, **options) -> VQVAE:
    """An untrained tiny model; the codes are vectors the encoder gives (the
    N(0, 1) codes of a fresh codebook would leave most vectors with one code)."""
    torch.manual_seed(seed)
    size = {"mlp": dict(hidden_dim=32, num_embeddings=6), "conv": dict(channels=8)}[model]
    config = ModelConfig(model=model, vector_dim=4, codebook_size=32, quantizer=quantizer,
                         quantizer_options=options, **size, **QUANTIZERS[quantizer])
    vqvae = VQVAE(config).eval()
    with torch.no_grad():
        z = vqvae.encoder(torch.rand(64, 1, 28, 28)).reshape(-1, 4)
        project_in = getattr(vqvae.quantizer, "project_in", None)
        if isinstance(project_in, torch.nn.Linear):  # codes live in the projected space
            z = project_in(z)
        quantizer = vqvae.quantizer
        for name, buffer in [*quantizer.named_buffers(), *quantizer.named_parameters()]:
            if name.endswith("embed"):  # (C, K, d), a parameter for a learnable codebook
                rows = torch.randint(len(z), buffer.shape[:2])
                buffer.copy_(z[rows, :buffer.shape[2]])
    return vqvae


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def check_onnx(model: VQVAE, out_dir) -> None:
    paths = export_model(model, out_dir, "onnx")
    encode = ort.InferenceSession(str(paths["encode"]))
    decode = ort.InferenceSession(str(paths["decode"]))
    distinct = set()
    for n in BATCHES:
        x = images(n, seed=n)
        expected = model.encode(x)
        (codes,) = encode.run(None, {"images": x.numpy()})
        assert codes.dtype == np.int64 and codes.shape == (n, *model.config.code_shape)
        np.testing.assert_array_equal(codes, expected.numpy())
        (decoded,) = decode.run(None, {"codes": codes})
        assert decoded.dtype == np.float32 and decoded.shape == (n, 1, 28, 28)
        assert np.abs(decoded - model.decode(expected).numpy()).max() <= TOLERANCE
        distinct.update(codes.reshape(-1).tolist())
    assert len(distinct) >= 3  # the comparison saw several codes, not one


@pytest.mark.parametrize("model, quantizer", [
    ("mlp", "ours"), ("conv", "rvq"), ("mlp", "rqvae"), ("conv", "grvq")])
def test_onnx_matches_eager(tmp_path, model, quantizer):
    check_onnx(tiny_model(model, quantizer), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model, quantizer", [
    ("conv", "ours"), ("mlp", "rvq"), ("conv", "rqvae"), ("mlp", "grvq")])
def test_onnx_matches_eager_rest_of_matrix(tmp_path, model, quantizer):
    check_onnx(tiny_model(model, quantizer), tmp_path)


@pytest.mark.parametrize("options", [
    {"codebook_dim": 3},
    pytest.param({"use_cosine_sim": True}, marks=pytest.mark.slow),
    pytest.param({"decay": None, "threshold_ema_dead_code": 0.0}, marks=pytest.mark.slow)])
def test_onnx_vector_quantize_options(tmp_path, options):
    check_onnx(tiny_model("mlp", "ours", **options), tmp_path)


def test_torch_export_archives_match_eager(tmp_path):
    model = tiny_model("conv", "grvq")
    paths = export_model(model, tmp_path, "torch")
    encode = torch.export.load(paths["encode"]).module()
    decode = torch.export.load(paths["decode"]).module()
    for n in BATCHES:
        x = images(n, seed=10 + n)
        codes = encode(x)
        assert torch.equal(codes, model.encode(x))
        assert (decode(codes) - model.decode(codes)).abs().max() <= TOLERANCE
    meta = json.loads(paths["meta"].read_text())
    assert meta["encode"]["output_shape"] == ["N", 7, 7, 2, 2]
    assert meta["decode"]["file"] == "decode.pt2" and meta["vocab_size"] == 32


@pytest.mark.parametrize("model", ["mlp", "conv"])
@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
def test_quantizer_programs_equal_eager_eval(model, quantizer):
    """The traced twin gives the eval forward's indices and decode's vectors, and the indices
    are the nearest codes by an independent float64 computation."""
    vqvae = tiny_model(model, quantizer)
    q = vqvae.quantizer
    program = quantizer_program(q)
    expected_type = {"ours": VectorQuantizeProgram, "rvq": ResidualProgram,
                     "rqvae": ResidualProgram, "grvq": GroupedResidualProgram}[quantizer]
    assert type(program) is expected_type
    z = vqvae.encoder(images(5)).detach()
    with torch.no_grad():
        indices = program.encode(z)
        assert torch.equal(indices, q(z).indices)
        assert torch.equal(program.decode(indices), q.decode(indices))
    if quantizer == "ours":  # the first depth by brute force in float64
        codes = q.book.vectors()[0].double()  # (K, d) of the one codebook
        brute = torch.cdist(z.double().reshape(-1, 4), codes).argmin(-1)
        assert torch.equal(indices.reshape(-1), brute)


def test_export_leaves_the_model_unchanged(tmp_path):
    vqvae = tiny_model("mlp", "rvq").train()
    before = {k: v.clone() for k, v in vqvae.state_dict().items()}
    with torch.no_grad():
        quantizer_program(vqvae.quantizer).encode(torch.randn(10, 6, 4))
    export_model(vqvae, tmp_path, "torch")
    assert vqvae.training and vqvae.quantizer.training
    for key, value in vqvae.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unregistered_quantizer_is_traced_as_it_is(tmp_path):
    class Rounding(torch.nn.Module):
        """Codes are the rounded values of one channel in [0, 4): a traceable quantizer."""

        def forward(self, x):
            indices = x[..., 0].mul(4).floor().clamp(0, 3).long()
            return VQOutput(self.decode(indices), indices, x.new_zeros(()))

        def decode(self, indices):
            return indices.float().unsqueeze(-1).expand(*indices.shape, 4) / 4

    model = tiny_model("mlp", "ours")
    model.quantizer = Rounding()
    assert isinstance(quantizer_program(model.quantizer), DirectProgram)
    paths = export_model(model, tmp_path, "torch")
    x = images(3)
    codes = torch.export.load(paths["encode"]).module()(x)
    assert torch.equal(codes, model.quantizer(model.encoder(x))[1])


def test_register_program_is_used_for_subclasses():
    from vqvae.quantizers import VectorQuantize

    class Special(VectorQuantize):
        pass

    class SpecialProgram(VectorQuantizeProgram):
        pass

    assert type(quantizer_program(Special(4, 8))) is VectorQuantizeProgram
    register_program(Special)(SpecialProgram)
    try:
        assert type(quantizer_program(Special(4, 8))) is SpecialProgram
    finally:
        from vqvae import export

        export._PROGRAMS.pop(Special)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(tiny_model("mlp", "ours"), tmp_path, "tflite")


@requires_mnist
@pytest.mark.slow
def test_cli_export_matches_encode_and_decode(tmp_path):
    """A trained tiny run: `vqvae export` codes equal `vqvae encode`'s for the first 100 test
    images, and the decoded images equal `vqvae decode`'s PNGs (8-bit) and the model's output
    within 1e-5."""
    from PIL import Image

    from vqvae.cli import main
    from vqvae.rundir import load_model
    from vqvae.train import TrainConfig, train
    from vqvae.workflow import load_codes

    run = train(TrainConfig(epochs=1, out_dir=str(tmp_path / "run"), train_subset=1000,
                            test_subset=200, batch_size=100, progress=False), ModelConfig())
    run_dir = str(run.run_dir)
    assert main(["encode", run_dir, "--indices", "0-99", "--out",
                 str(tmp_path / "codes.json")]) == 0
    assert main(["decode", run_dir, str(tmp_path / "codes.json"), "--out",
                 str(tmp_path / "png")]) == 0
    assert main(["export", run_dir, "--out", str(tmp_path / "onnx")]) == 0
    model = load_model(run_dir)
    expected, _ = load_codes(tmp_path / "codes.json", model.config)
    from vqvae.data import load_dataset

    test = load_dataset("mnist", "test", None, progress=False)
    x = test.as_float()[:100].unsqueeze(1).numpy()
    encode = ort.InferenceSession(str(tmp_path / "onnx" / "encode.onnx"))
    decode = ort.InferenceSession(str(tmp_path / "onnx" / "decode.onnx"))
    (codes,) = encode.run(None, {"images": x})
    np.testing.assert_array_equal(codes, expected.numpy())
    (decoded,) = decode.run(None, {"codes": codes})
    assert np.abs(decoded - model.decode(expected).numpy()).max() <= TOLERANCE
    pngs = np.stack([np.asarray(Image.open(tmp_path / "png" / f"{i:05d}.png"))
                     for i in range(100)])
    assert np.abs(decoded[:, 0] * 255 - pngs).max() <= 0.5 + 1e-3


class Contract(torch.nn.Module):
    """FSQ or LFQ behind the registry's contract ``quantized, indices, loss = q(x)`` and
    ``decode``; the gain spreads the tiny model's small outputs over many codes."""

    def __init__(self, quantizer, gain: float = 20.0):
        super().__init__()
        self.quantizer, self.gain = quantizer, gain

    def forward(self, x):
        out = self.quantizer(x * self.gain)
        return VQOutput(out[0], out[1], x.new_zeros(()))

    def decode(self, indices):
        return self.quantizer.indices_to_codes(indices)


@pytest.mark.parametrize("family", [
    "fsq", pytest.param("lfq", marks=pytest.mark.slow)])
def test_other_families_export_as_they_are(tmp_path, family):
    """Quantizers without a registered twin are traced as they are: their eval forward and
    decode must hold no host-side check while exporting."""
    from vqvae.quantizers.fsq import FSQ
    from vqvae.quantizers.lfq import LFQ

    model = tiny_model("mlp", "ours")
    torch.manual_seed(0)
    model.quantizer = Contract(FSQ(levels=[5, 4, 3], dim=4) if family == "fsq"
                               else LFQ(dim=4, codebook_size=16))
    model.eval()
    assert isinstance(quantizer_program(model.quantizer), DirectProgram)
    paths = export_model(model, tmp_path, "onnx")
    encode = ort.InferenceSession(str(paths["encode"]))
    decode = ort.InferenceSession(str(paths["decode"]))
    x = images(8)
    (codes,) = encode.run(None, {"images": x.numpy()})
    expected = model.encode(x)
    np.testing.assert_array_equal(codes, expected.numpy())
    assert len(np.unique(codes)) >= 3
    (decoded,) = decode.run(None, {"codes": codes})
    with torch.no_grad():
        reference = model.decoder(model.quantizer.decode(expected)).numpy()
    assert np.abs(decoded - reference).max() <= TOLERANCE


def test_search_takes_the_plain_path_while_exporting():
    """nearest_code under torch.export: no C-kernel op in the graph (ONNX has none), and the
    same indices as the eager search and a float64 brute force."""
    from vqvae.quantizers.search import nearest_code

    class Search(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.codes = torch.nn.Parameter(torch.randn(300, 8, generator=torch.Generator()
                                                        .manual_seed(0)))

        def forward(self, x):
            return nearest_code(x, self.codes)

    module = Search()
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("n")},))
    # every graph, the nested ones too (no_grad becomes a higher-order op with its own graph)
    targets = {str(node.target) for graph in program.graph_module.modules()
               if isinstance(graph, torch.fx.GraphModule)
               for node in graph.graph.nodes if node.op == "call_function"}
    assert not any("vqvae" in target for target in targets), targets
    y = torch.randn(70, 8, generator=torch.Generator().manual_seed(2))
    brute = torch.cdist(y.double(), module.codes.detach().double()).argmin(-1)
    assert torch.equal(program.module()(y), brute)
    assert torch.equal(module(y), brute)
