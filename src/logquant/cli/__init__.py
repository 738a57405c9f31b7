"""The ``logquant`` command: each subcommand parses, calls one library function, prints.

Layout (arrows point down only): this module builds the parser from the command modules
(``train``, ``evaluate``, ``sweep``, ``engine``, ``search``), which use the shared helpers
(``options``, ``config_options``), which use the library. No command imports another.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from logquant.cli import engine, evaluate, search, sweep, train
from logquant.cli.options import Parser
from logquant.errors import LogquantError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="logquant", description="CNNs in logarithmic (power-of-two) data "
                    "representation: exact formats, quantization, the paper's experiments, "
                    "training.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected (internal) error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train.add_train(sub)
    evaluate.add_commands(sub)
    sweep.add_commands(sub)
    train.add_reproduce_training(sub)
    engine.add_commands(sub)
    search.add_commands(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (2: a bad input, one ``error:`` line; 1: a bug
    of ours; 141: stdout closed; 130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"] or os.environ.get("LOGQUANT_DEBUG") == "1"
    warnings.showwarning = _one_line_warning  # "warning: ..." lines, not source excerpts
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args, argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except LogquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`logquant cost ... | head`): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a killed writer
    except OSError as exc:  # the machine refused (disk full, permissions): one line too
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: one line, the traceback only when asked
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error, a bug in logquant ({type(exc).__name__}: {first}); "
              "rerun with 'logquant --debug ...' for the traceback and please report it",
              file=sys.stderr)
        return 1
