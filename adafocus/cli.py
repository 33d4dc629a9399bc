"""The `adafocus` command line: a thin typer layer over the Python API.

Every command calls one public function that a notebook can call with the same arguments. User errors
(``AdaFocusError``, ``OSError``) become one line on stderr and exit code 1; ``--verbose`` (or
``ADAFOCUS_VERBOSE=1``) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from adafocus.errors import AdaFocusError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deploy Uni-AdaFocus adaptive video recognition models: export, run, calibrate, benchmark.",
    pretty_exceptions_enable=False,
)
calibrate_app = typer.Typer(help="Calibrate a bundle: exit thresholds for budgets, INT8 precision.",
                            no_args_is_help=True)
app.add_typer(calibrate_app, name="calibrate")

_VERBOSE = {"on": os.environ.get("ADAFOCUS_VERBOSE", "") not in ("", "0")}


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks on errors.")):
    if verbose:
        _VERBOSE["on"] = True


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------------------------- models
@app.command("presets")
def presets_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the model presets, one line each."""
    from adafocus.models.presets import list_presets

    rows = list_presets()
    if as_json:
        _echo_json([r.to_dict() for r in rows])
        return
    for p in rows:
        typer.echo(f"{p.name:<22} {p.description}")


@app.command("init")
def init_cmd(
    preset: str = typer.Option(..., "--preset", help="Preset name (see `adafocus presets`)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint to write (.pt)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    num_classes: int = typer.Option(None, "--num-classes", help="Override the preset's class count."),
):
    """Write a randomly initialised checkpoint in adafocus's format (for trying the exporter, tests)."""
    from adafocus.models import init_checkpoint

    path = init_checkpoint(preset, out, seed=seed, num_classes=num_classes)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("flops")
def flops_cmd(
    preset: str = typer.Option(..., "--preset", help="Preset name."),
    num_classes: int = typer.Option(None, "--num-classes", help="Override the preset's class count."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Multiply-add GFLOPs per stage and the cumulative cost at every exit, counted on the real modules."""
    from adafocus.models.flops import count_flops

    report = count_flops(preset, num_classes=num_classes)
    if as_json:
        _echo_json(report.to_dict())
        return
    typer.echo(report.format())


# ------------------------------------------------------------------------------------- entry points
def _click():
    try:  # recent typer vendors click as typer._click
        from typer import _click as click

        click.exceptions.ClickException  # noqa: B018
        return click
    except (ImportError, AttributeError):
        import click

        return click


def _run(typer_app: typer.Typer, argv: list[str] | None = None) -> int:
    click = _click()
    try:
        rv = typer_app(args=argv, standalone_mode=False, prog_name=Path(sys.argv[0]).name)
        return rv if isinstance(rv, int) else 0
    except (typer.Exit, getattr(click.exceptions, "Exit", typer.Exit)) as exc:
        return getattr(exc, "exit_code", 0)
    except (typer.Abort, getattr(click.exceptions, "Abort", typer.Abort)):
        typer.echo("aborted", err=True)
        return 130
    except click.exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except (AdaFocusError, OSError, ValueError) as exc:
        if _VERBOSE["on"]:
            raise
        typer.echo(f"error: {_one_line(exc)}", err=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: never a bare traceback for users
        if _VERBOSE["on"]:
            raise
        typer.echo(f"error: internal error {type(exc).__name__}: {_one_line(exc)} (rerun with --verbose)",
                   err=True)
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if "\n" not in text else text  # multi-line blocks (key mismatches) are kept whole


def _single(command_name: str) -> typer.Typer:
    """A one-command app that runs `adafocus <command_name>` directly (adafocus-export, adafocus-run)."""
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    for info in app.registered_commands:
        if info.name == command_name:
            sub.command(command_name, help=info.help)(info.callback)
            return sub
    raise RuntimeError(f"no command {command_name}")


def main(argv: list[str] | None = None) -> None:
    sys.exit(_run(app, argv))


def export_main(argv: list[str] | None = None) -> None:
    sys.exit(_run(_single("export"), argv))


def run_main(argv: list[str] | None = None) -> None:
    sys.exit(_run(_single("run"), argv))


if __name__ == "__main__":  # pragma: no cover
    main()
