"""Weights as safetensors: save a model to a directory and rebuild it, with no pickle anywhere.

    model.save_pretrained("exported/")         # exported/model.safetensors + exported/config.json
    model = VQVAE.from_pretrained("exported/")  # or a run directory of `vqvae train`

``model.safetensors`` holds the module's ``state_dict`` and nothing else: every tensor is made
contiguous, moved to the CPU, and tensors that share memory are written as separate copies (the
format stores each tensor's bytes once and refuses aliases). ``config.json`` holds the
constructor's config under the key ``"model"``, the format ``vqvae train`` already writes into
every run directory (``{"model": ..., "train": ...}``), so a run directory is also a pretrained
directory once its weights are saved there. Loading reads JSON and safetensors only: no
``torch.load``, no unpickling, so a downloaded model cannot run code.

A class takes part by inheriting :class:`PretrainedMixin` ahead of ``nn.Module``, keeping its
config in ``self.config`` (an object with ``to_dict()`` and a ``from_dict()`` classmethod) and
taking that config as its constructor's one argument.
"""

from __future__ import annotations

import inspect
import json
import typing
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: Where the constructor's config sits inside config.json (the run directory's layout).
CONFIG_KEY = "model"


def _atomic_write(path: Path, payload: bytes) -> None:
    # Imported here: rundir imports models, which imports this module.
    from .rundir import atomic_write_bytes

    atomic_write_bytes(path, payload)


def plain_tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    """``state`` as safetensors can store it: detached, contiguous CPU tensors that share no
    memory with each other. Raises ``TypeError`` on an entry that is not a tensor."""
    out: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}, not a "
                            f"tensor: safetensors stores tensors only")
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        # A view of a tensor already taken (tied weights, a slice of a larger buffer) or of the
        # original module memory gets its own copy, so the file never aliases two names.
        if storage in seen_storages or tensor.untyped_storage().nbytes() != \
                tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
            storage = tensor.untyped_storage().data_ptr()
        if tensor.numel():
            seen_storages.add(storage)
        out[name] = tensor
    return out


class PretrainedMixin:
    """``save_pretrained(directory)`` and ``from_pretrained(directory)`` for an ``nn.Module``.

    The config class is ``config_class`` when set, otherwise the annotation of the constructor's
    first parameter (``def __init__(self, config: ModelConfig)``).
    """

    config_class: type | None = None
    #: File names inside the directory: a second model kept beside a run's own (the prior)
    #: takes other names, so both fit in one run directory.
    weights_name: str = WEIGHTS_NAME
    config_name: str = CONFIG_NAME

    @classmethod
    def _config_type(cls) -> type:
        if cls.config_class is not None:
            return cls.config_class
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        hints = typing.get_type_hints(cls.__init__) if parameters else {}
        config_type = hints.get(parameters[0].name) if parameters else None
        if not isinstance(config_type, type) or not hasattr(config_type, "from_dict"):
            raise TypeError(f"{cls.__name__} must set config_class or annotate its constructor's "
                            f"first parameter with a config class that has from_dict()")
        return config_type

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (``weights_name``, ``config_name``)
        into ``directory``; returns it.

        An existing ``config.json`` (a run directory's) keeps its other keys and is left
        untouched when it already describes this model; one that describes another model is an
        error, since the weights would no longer match it.
        """
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_config = self.config.to_dict()
        config_path = directory / self.config_name
        values: dict[str, Any] = {}
        if config_path.is_file():
            values = json.loads(config_path.read_text())
            if not isinstance(values, dict):
                raise ValueError(f"{config_path} is not a JSON object; save into an empty "
                                 f"directory or a run directory")
            existing = values.get(CONFIG_KEY)
            if existing is not None and not self._describes_this_model(existing):
                raise ValueError(f"{config_path} describes another model "
                                 f"({existing!r}, this one is {model_config!r}); save into an "
                                 f"empty directory or that model's own")
        if values.get(CONFIG_KEY) is None:
            values[CONFIG_KEY] = model_config
            _atomic_write(config_path, (json.dumps(values, indent=2) + "\n").encode())
        payload = save(plain_tensors(self.state_dict()), metadata={"format": "pt"})
        _atomic_write(directory / self.weights_name, payload)
        return directory

    def _describes_this_model(self, values: Any) -> bool:
        """Whether a stored config rebuilds this model's: equal as written, or once read back
        through the config class (a run recorded before an option with a default was added
        still describes the model it trained)."""
        if values == self.config.to_dict():
            return True
        try:
            return self._config_type().from_dict(values).to_dict() == self.config.to_dict()
        except (TypeError, ValueError, KeyError):
            return False

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        """The model saved in ``directory`` (by ``save_pretrained``), on ``device``, in eval mode.

        Reads ``config.json`` and ``model.safetensors`` only; every parameter and buffer must be
        in the file (and nothing else), with the shapes the config gives.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / cls.config_name, directory / cls.weights_name
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: {directory} holds no saved model (write one with "
                    f"model.save_pretrained({str(directory)!r}))")
        values = json.loads(config_path.read_text())
        if not isinstance(values, dict) or not isinstance(values.get(CONFIG_KEY), dict):
            raise ValueError(f"{config_path} has no {CONFIG_KEY!r} object with the model's "
                             f"config")
        config = cls._config_type().from_dict(values[CONFIG_KEY])
        model = cls(config)
        state = load_file(weights_path, device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights_path} does not match the config in {config_path}: "
                             f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        return model.to(device).eval()
