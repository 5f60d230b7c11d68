"""The argument parser of ``nanobanana``: every command, option and its help."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .. import __version__
from .._client import BASE_URL_ENV, TOKEN_ENV
from .._protocol import ASPECT_RATIOS, RESOLUTIONS
from . import __doc__ as _PACKAGE_DOC

__all__ = ["build_parser"]

# The package docstring documents the JSON shape and exit codes once, for both.
_EPILOG = (_PACKAGE_DOC or "").split("\n\n", 1)[-1]
_RATIOS = sorted(ASPECT_RATIOS, key=lambda r: (int(r.split(":")[0]), int(r.split(":")[1])))


def _number(
    kind: type[float] | type[int], ok: Callable[[float], bool], rule: str
) -> Callable[[str], float]:
    """An argparse ``type`` that reads a number of ``kind`` and checks it with ``ok``."""

    def read(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    return read


_positive_float = _number(float, lambda value: value > 0, "must be positive")
_fraction = _number(float, lambda value: 0.0 <= value <= 1.0, "must be from 0 to 1")
_port = _number(int, lambda value: 0 <= value <= 65535, "must be from 0 to 65535")


def _add_debug(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show tracebacks and debug logs on stderr",
    )


def _add_connection(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options for commands that talk to the API; also accepted before the command.

    On subcommands their defaults are SUPPRESS, so they do not overwrite a value
    given before the command name.
    """
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--token",
        default=None if top else argparse.SUPPRESS,
        help=f"API token (default: ${TOKEN_ENV})",
    )
    group.add_argument(
        "--base-url",
        default=None if top else argparse.SUPPRESS,
        metavar="URL",
        help=f"API base URL (default: ${BASE_URL_ENV}, else https://api.acedata.cloud)",
    )
    group.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=1.0 if top else argparse.SUPPRESS,
        metavar="S",
        help="first wait between task reads, growing to 5 s (default: 1)",
    )
    _add_debug(parser, default=False if top else argparse.SUPPRESS)


def _add_output(parser: argparse.ArgumentParser, *, wait: bool = True) -> None:
    if wait:
        parser.add_argument(
            "--timeout",
            type=_positive_float,
            default=600.0,
            metavar="S",
            help="stop waiting after S seconds, exit code 4 (default: 600)",
        )
        parser.add_argument(
            "--out", metavar="DIR", help="download the images into DIR (created if needed)"
        )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (see --help)"
    )


def _add_submission(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what the image should show")
    parser.add_argument("--model", help="model name, e.g. nano-banana-pro (default: nano-banana)")
    parser.add_argument("--aspect-ratio", choices=_RATIOS, metavar="R", help=", ".join(_RATIOS))
    parser.add_argument(
        "--resolution",
        choices=sorted(RESOLUTIONS),
        metavar="X",
        help=", ".join(sorted(RESOLUTIONS)) + " (only some models go past 1K)",
    )
    parser.add_argument(
        "--count", type=int, choices=range(1, 5), metavar="N", help="images to make, 1 to 4"
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="print the task id and exit at once; wait later with 'tasks wait'",
    )
    _add_output(parser)


def build_parser() -> argparse.ArgumentParser:
    """The parser for ``nanobanana``'s whole command line."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="nanobanana",
        description="Generate and edit images with the AceData Cloud Nano Banana API.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_connection(parser, top=True)

    api = argparse.ArgumentParser(add_help=False)
    _add_connection(api, top=False)
    debug_only = argparse.ArgumentParser(add_help=False)
    _add_debug(debug_only, default=argparse.SUPPRESS)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = commands.add_parser(
        "generate",
        parents=[api],
        help="make images from a prompt",
        description="Submit a generation, wait for it with a live status line, print the "
        "image URLs (or, with --out, the saved files).",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    _add_submission(generate)

    edit = commands.add_parser(
        "edit",
        parents=[api],
        help="change images as a prompt says",
        description="Submit an edit of one or more images, wait, print the image URLs. "
        "A local file is sent inline as a data: URL (an image, at most 10 MB).",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    _add_submission(edit)
    edit.add_argument(
        "--image",
        dest="images",
        action="append",
        required=True,
        metavar="URL_OR_FILE",
        help="an http(s) URL or a local PNG/JPEG/WebP/GIF file; repeat for several",
    )

    tasks = commands.add_parser("tasks", help="read or wait for tasks by id")
    task_commands = tasks.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    get = task_commands.add_parser(
        "get",
        parents=[api],
        help="read tasks once",
        description="Read tasks once (one 'retrieve', or 'retrieve_batch' for several).",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    get.add_argument("ids", nargs="+", metavar="ID", help="task ids; '-' reads them from stdin")
    _add_output(get, wait=False)
    wait = task_commands.add_parser(
        "wait",
        parents=[api],
        help="wait until tasks finish",
        description="Wait until tasks finish, with a progress bar, then print a summary. "
        "'-' reads ids from stdin: whitespace-separated, or the --json output of another "
        "nanobanana command.",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    wait.add_argument("ids", nargs="+", metavar="ID", help="task ids; '-' reads them from stdin")
    _add_output(wait)

    demo = commands.add_parser(
        "demo",
        parents=[debug_only],
        help="try it out against a local simulation: no token, no network",
        description="Start the fake server in this process and generate a few images "
        "through the real client: submit, wait, download. Nothing leaves this machine.",
    )
    demo.add_argument(
        "--out", metavar="DIR", help="where to save the images (default: a new temp folder)"
    )
    demo.add_argument("--json", action="store_true", help="print the JSON document on stdout")

    fake = commands.add_parser(
        "fake-server",
        parents=[debug_only],
        help="run the fake Nano Banana server for offline development",
        description="Run the fake server in the foreground until Ctrl-C (then exit 0). "
        "Prompts containing [fail], [fail:top] or [fail:empty] fail on purpose.",
    )
    fake.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    fake.add_argument("--port", type=_port, default=0, help="API port (default: 0, any free port)")
    fake.add_argument(
        "--duration",
        nargs=2,
        type=float,
        default=[1.0, 5.0],
        metavar=("LO", "HI"),
        help="seconds a task takes, drawn from LO to HI (default: 1 5)",
    )
    fake.add_argument(
        "--fail-rate",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="fraction of submissions that fail (default: 0)",
    )
    fake.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help="the token the server accepts (default: test-token)",
    )
    return parser
