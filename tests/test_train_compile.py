"""``vqvae train --compile``: the whole model, quantizer included, compiled as one graph where
the quantizer allows, and a fallback to compiled encoder and decoder, with a warning that says
why, where it does not.

The end-to-end runs use inductor, as ``vqvae train`` does (a C++ compiler on CPU); each costs
tens of seconds of compilation, so there are few of them and they train on small subsets
(whole batches, one evaluation batch: one training and one evaluation graph).
"""

import json
import warnings

import pytest
import torch
from conftest import requires_mnist
from torch import nn

from vqvae.cli import main
from vqvae.compiled import CompiledForward, compile_model, describe
from vqvae.models import VQVAE, ModelConfig
from vqvae.quantizers.fsq import FSQ
from vqvae.train import TrainConfig, make_optimizer, train, train_step

QUICK = dict(train_subset=512, test_subset=200, batch_size=128, epochs=1, progress=False)


def run_pair(tmp_path, quantizer: str, options: dict | None = None):
    """The same short run eager and with ``compile=True``."""
    model_config = ModelConfig(quantizer=quantizer, codebook_size=64,
                               quantizer_options=dict(options or {}))
    eager = train(TrainConfig(out_dir=str(tmp_path / "eager"), **QUICK), model_config)
    compiled = train(TrainConfig(out_dir=str(tmp_path / "compiled"), compile=True, **QUICK),
                     model_config)
    return eager, compiled


@requires_mnist
@pytest.mark.slow
@pytest.mark.parametrize("quantizer, options", [
    # the preset's k-means start runs kmeans_fixed when compiled and kmeans eagerly: another
    # algorithm (see the test below), so the equality is checked without it
    ("simvq", {"kmeans_init": False}),
    ("ours", {}),
], ids=["simvq", "ours"])
def test_train_compile_compiles_the_whole_model(tmp_path, quantizer, options):
    eager, compiled = run_pair(tmp_path, quantizer, options)
    forward = compiled.model.forward
    assert isinstance(forward, CompiledForward)
    assert forward.mode == "whole", forward.reason
    # same seed, data order and algorithm: the same run up to the compiler's float rounding
    # (which Adam's normalised first steps amplify in the weights of near-zero gradients, so
    # the losses are compared, not the weights)
    for key in ("test_mse", "perplexity"):
        assert compiled.metrics[key] == pytest.approx(eager.metrics[key], rel=1e-3), key
    first, again = eager.metrics["epochs"][0], compiled.metrics["epochs"][0]
    assert again["train_loss"] == pytest.approx(first["train_loss"], rel=1e-4)


@requires_mnist
@pytest.mark.slow
def test_train_compile_simvq_preset_initialises_inside_the_graph(tmp_path):
    """The simvq preset (k-means start) compiles whole; its start, clustered by kmeans_fixed
    in the graph, trains as well as the eager k-means start."""
    eager, compiled = run_pair(tmp_path, "simvq")
    forward = compiled.model.forward
    assert forward.mode == "whole", forward.reason
    quantizer = [m for m in compiled.model.modules() if hasattr(m, "kmeans_init")]
    assert quantizer and all(bool(m.initted) for m in quantizer)
    assert compiled.metrics["test_mse"] == pytest.approx(eager.metrics["test_mse"], rel=0.1)


@requires_mnist
@pytest.mark.slow
def test_cli_train_compile_with_fsq(tmp_path):
    """Through the CLI: ``--compile`` compiles the whole FSQ model without a warning, and the
    run equals the eager one (FSQ's rounding is deterministic)."""
    args = ["train", "--quantizer", "fsq", "--epochs", "1", "--train-subset", "512",
            "--test-subset", "200", "--batch-size", "128", "--no-progress"]
    assert main(args + ["--out-dir", str(tmp_path / "eager")]) == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="--compile")  # no fallback
        assert main(args + ["--compile", "--out-dir", str(tmp_path / "compiled")]) == 0
    eager = json.loads((tmp_path / "eager" / "metrics.json").read_text())
    compiled = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    assert compiled["test_mse"] == pytest.approx(eager["test_mse"], rel=1e-4)
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["train"]["compile"]


class HostReadQuantizer(nn.Module):
    """FSQ behind a branch on a tensor value (which one graph cannot hold), counting its calls
    in a buffer: a trace that fails must not have counted."""

    def __init__(self):
        super().__init__()
        self.fsq = FSQ(levels=[5, 5, 5, 5], dim=16)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        if float(x.detach().abs().max()) > 1e6:  # a host read
            raise ValueError("too large")
        quantized, indices = self.fsq(x)
        return quantized, indices, quantized.new_zeros(())

    def decode(self, indices):
        return self.fsq.decode(indices)


def test_untraceable_quantizer_falls_back_to_compiled_networks_with_a_warning():
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(quantizer="fsq", quantizer_options={"levels": [5, 5, 5, 5]}))
    model.quantizer = HostReadQuantizer()
    reference = VQVAE(model.config)
    reference.quantizer = HostReadQuantizer()
    reference.load_state_dict(model.state_dict())
    config = TrainConfig(batch_size=32)
    optimisers = [make_optimizer(m, config, torch.device("cpu")) for m in (model, reference)]
    forward = compile_model(model, backend="aot_eager")
    assert compile_model(model) is forward  # compiling twice changes nothing
    images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match=r"HostReadQuantizer quantizer cannot be traced .*"
                                            r"test_train_compile.py:\d+ in forward.*encoder and "
                                            r"decoder only"):
        out = train_step(model, optimisers[0], images[:32])
    assert forward.mode == "parts" and "test_train_compile.py" in forward.reason
    for network in (model.encoder, model.decoder):
        assert hasattr(network.forward, "_torchdynamo_orig_callable")
    expected = train_step(reference, optimisers[1], images[:32])
    torch.testing.assert_close(out.loss, expected.loss)
    assert torch.equal(out.indices, expected.indices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every step
        train_step(model, optimisers[0], images[32:])
    train_step(reference, optimisers[1], images[32:])
    assert int(model.quantizer.calls) == 2  # the failed trace changed nothing
    for (key, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(),
                                strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


def test_describe_names_the_error_and_the_user_code():
    error = torch._dynamo.exc.Unsupported(
        "Data-dependent branching\n  Explanation: ...\n\nfrom user code:\n"
        '   File "/x/models.py", line 10, in forward\n    z = q(x)\n'
        '   File "/x/quantizers/thing.py", line 42, in check\n    if t.any():')
    assert describe(error) == "Unsupported: Data-dependent branching at thing.py:42 in check"
    error = torch._dynamo.exc.UserError(
        torch._dynamo.exc.UserErrorType.ANTI_PATTERN,
        "Could not guard on data-dependent expression u0\n\nCaused by: if bool(x):  "
        "# src/q.py:7 in forward (_dynamo/utils.py:1 in run_node)")
    assert describe(error) == ("UserError: Could not guard on data-dependent expression u0 "
                               "at q.py:7 in forward")


def test_bad_input_raises_its_own_error_and_the_model_stays_compiled():
    """A first call on input the model refuses fails its trace; that is the input's fault, not
    the quantizer's: the eager error is raised and the next good call runs the one graph."""
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(quantizer="simvq", codebook_size=64))
    forward = compile_model(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            model(torch.rand(2, 1, 27, 27))
        assert forward.mode == "whole"
        reconstruction, indices, _ = model(torch.rand(2, 1, 28, 28))
    assert forward.mode == "whole" and reconstruction.shape == (2, 1, 28, 28)
    assert indices.shape == (2, 16)


def test_compiled_step_on_a_nan_batch_reports_the_quantizer_and_changes_nothing():
    """The whole compiled model reads nothing back in forward; the NaN that reaches SimVQ is
    counted on the device and train_step raises at its loss read-back, naming the quantizer,
    before the optimiser step."""
    from vqvae.quantizers.checks import QuantizerInputError

    torch.manual_seed(0)
    model = VQVAE(ModelConfig(quantizer="simvq", codebook_size=64))
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    forward = compile_model(model, backend="aot_eager")
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    train_step(model, optimizer, images)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images[3, 0, 5, 5] = float("nan")
    with pytest.raises(QuantizerInputError, match=r"reached quantizer\S* \(1 call"):
        train_step(model, optimizer, images)
    assert forward.mode == "whole"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    train_step(model, optimizer, images.nan_to_num(0.5))  # and training goes on
