"""The `lmforge` command: one Typer app; each stage registers its own sub-commands."""
from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console
from rich.markup import escape

from lmforge.errors import LmforgeError

app = typer.Typer(help="lmforge: the whole life of a language model.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

# Each module exposes `register(app)`; the order is the order of a model's life.
STAGES = (
    "lmforge.data.cli",
    "lmforge.tokenizer.cli",
    "lmforge.train.cli",
    "lmforge.model.cli",
    "lmforge.align.cli",
    "lmforge.serve.cli",
    "lmforge.quant.cli",
    "lmforge.eval.cli",
    "lmforge.safety.cli",
    "lmforge.plan.cli",
    "lmforge.speedrun",
)
for _module in STAGES:
    importlib.import_module(_module).register(app)


def run(argv: list[str]) -> int:
    """Run one command line; -> exit code. User errors become one red line and exit code 2, never
    a traceback: LmforgeError, and the file-system mistakes every command can meet (a path that is
    a file where a folder is expected, a folder where a file is, a file that is not UTF-8)."""
    try:
        typer.main.get_command(app).main(args=argv, prog_name="lmforge", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except LmforgeError as e:
        return _user_error(str(e))
    except UnicodeDecodeError as e:
        return _user_error(f"a file is not UTF-8 text ({e.reason} at byte {e.start})")
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        return _user_error(f"{e.strerror}: {e.filename}" if e.filename else str(e))
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        return 130
    return 0


def _user_error(message: str) -> int:
    # soft_wrap: one line however long (Rich would otherwise fold it at 80 columns when piped)
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return 2


def main() -> None:
    sys.exit(run(sys.argv[1:]))
