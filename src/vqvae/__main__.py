"""``python -m vqvae``: the same as the ``vqvae`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
