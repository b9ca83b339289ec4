"""The README's examples of the FSQ, LFQ and SimVQ families run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## The FSQ, LFQ and SimVQ families"


def section_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start:end if end >= 0 else None]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_section_has_an_example_per_class():
    code = "\n".join(section_blocks())
    for name in ("FSQ", "ResidualFSQ", "GroupedResidualFSQ", "FSP", "LFQ", "ResidualLFQ",
                 "GroupedResidualLFQ", "EvoLFQ", "BinaryMapper", "SimVQ", "ResidualSimVQ",
                 "LatentQuantize", "RandomProjectionQuantizer", "HierarchicalVQ", "Sequential"):
        assert re.search(rf"\b{name}\(", code), name


@pytest.mark.parametrize("index", range(len(section_blocks())))
def test_example_runs(index, capsys):
    import torch

    torch.manual_seed(0)
    exec(compile(section_blocks()[index], f"README.md block {index}", "exec"), {})
