"""Which module may import which: the library never reaches up into the workflow or the CLI."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vqvae"


def imported(path: Path) -> set[str]:
    """The ``vqvae`` modules ``path`` imports (relative imports resolved), anywhere in it."""
    package = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            names.add(".".join(base + ((node.module,) if node.module else ())))
            if not node.module:
                names |= {".".join(base + (a.name,)) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n == "vqvae" or n.startswith("vqvae.")}


@pytest.mark.parametrize("module,forbidden", [
    ("judge.py", ["vqvae.prior", "vqvae.train", "vqvae.workflow", "vqvae.cli"]),
    ("prior.py", ["vqvae.train", "vqvae.workflow", "vqvae.cli", "vqvae.judge"]),
    ("train.py", ["vqvae.workflow", "vqvae.cli", "vqvae.prior", "vqvae.judge"]),
    ("models.py", ["vqvae.train", "vqvae.workflow", "vqvae.cli"]),
    ("rundir.py", ["vqvae.workflow", "vqvae.cli"]),
])
def test_library_modules_do_not_import_the_layers_above(module, forbidden):
    names = imported(SRC / module)
    assert names, module  # the parser found its imports
    for name in forbidden:
        assert not any(n == name or n.startswith(name + ".") for n in names), (module, name)


def test_quantizers_know_nothing_of_the_application():
    for path in (SRC / "quantizers").glob("*.py"):
        names = imported(path)
        assert all(n.startswith("vqvae.quantizers") for n in names), (path.name, names)
