"""The device-side non-finite rule (quantizers/guard.py): the verdict, the counters, the error
raised at the caller's read-back, and which calls defer."""

import pytest
import torch
from torch import nn

from vqvae.quantizers import guard
from vqvae.quantizers.checks import QuantizerInputError


@pytest.mark.parametrize("value, expected", [
    (1.0, True), (0.0, True), (float("nan"), False), (float("inf"), False),
    (-float("inf"), False),
    (1e30, False),  # finite, but its square overflows float32
    (1e18, True),
])
def test_usable_is_false_exactly_for_nonfinite_or_unsquarable_values(value, expected):
    rows = torch.randn(3, 4)
    rows[1, 2] = value
    verdict = guard.usable(rows)
    assert verdict.dtype == torch.bool and verdict.ndim == 0
    assert bool(verdict) is expected


def test_usable_accepts_an_empty_batch():
    assert bool(guard.usable(torch.empty(0, 4)))


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        guard.register_counter(self)


def test_counter_is_not_saved_in_checkpoints():
    assert guard.COUNTER not in Holder().state_dict()


def test_raise_deferred_names_the_modules_that_refused_and_resets():
    model = nn.Sequential(Holder(), Holder(), nn.Linear(2, 2))
    guard.raise_deferred(model)  # nothing refused: silent
    guard.record(model[1], torch.tensor(False))
    guard.record(model[1], torch.tensor(False))
    guard.record(model[0], torch.tensor(True))
    with pytest.raises(QuantizerInputError, match=r"1 \(2 call\(s\)\)") as error:
        guard.raise_deferred(model)
    assert "0 (" not in str(error.value)
    guard.raise_deferred(model)  # the counts were reset


def test_raise_deferred_on_a_model_without_quantizers_does_nothing():
    guard.raise_deferred(nn.Linear(2, 2))


def test_modes_choose_when_calls_defer():
    cpu = torch.zeros(1)
    assert guard.get_input_checks() == "auto"
    assert not guard.deferred(cpu)  # auto: immediate on the CPU
    assert guard.deferred(torch.zeros(1, device="meta"))  # auto: deferred elsewhere
    with guard.input_checks("deferred"):
        assert guard.deferred(cpu)
    with guard.input_checks("immediate"):
        assert not guard.deferred(torch.zeros(1, device="meta"))
    assert guard.get_input_checks() == "auto"
    with pytest.raises(ValueError, match="one of auto, immediate, deferred"):
        guard.set_input_checks("never")


class RefusingModel(nn.Module):
    """Stands for a model whose quantizer refused its batch on the device: it records the
    refusal and still returns a finite loss (the deferred check, not the loss, must stop the
    step)."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(4, 4)
        self.quantizer = Holder()
        self.quantizer.register_buffer("state", torch.zeros(2))

    def forward(self, batch):
        self.quantizer.state.add_(1.0)  # a buffer written in forward, as an EMA does
        guard.record(self.quantizer, torch.tensor(False))
        out = self.decoder(batch.reshape(len(batch), 4)).reshape(batch.shape)
        return out, torch.zeros(len(batch), dtype=torch.long), out.sum() * 0.0


def test_train_step_raises_the_deferred_error_and_restores_buffers():
    from vqvae.train import train_step

    model = RefusingModel()
    weight = model.decoder.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(QuantizerInputError, match="quantizer"):
        train_step(model, optimizer, torch.rand(3, 1, 2, 2))
    assert torch.equal(model.quantizer.state, torch.zeros(2))
    assert torch.equal(model.decoder.weight, weight)
