"""The ``pacifica-like`` command line: one module per command group."""

from pacifica_like.cli.main import main

__all__ = ["main"]
