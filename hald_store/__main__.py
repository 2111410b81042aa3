"""``python -m hald_store`` runs the CLI (also under torchrun)."""

from .cli import main

main()
