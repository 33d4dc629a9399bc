"""The ``adafocus batch`` and ``adafocus serve`` commands (registered on the main typer app)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``batch`` and ``serve`` to ``app`` (work in progress: nothing registered yet)."""
