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
_non_negative_float = _number(float, lambda value: value >= 0, "must be 0 or more")
_positive_int = _number(int, lambda value: value >= 1, "must be at least 1")
_non_negative_int = _number(int, lambda value: value >= 0, "must be 0 or more")
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
        help="shortest wait between reads of a task, which grows to 1.5x it; "
        "a new task is first read at 2.5x it (default: 1)",
    )
    _add_debug(parser, default=False if top else argparse.SUPPRESS)


def _add_timeout(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        metavar="S",
        help=f"stop {what} after S seconds, downloads included; exit code 4 (default: 600)",
    )


def _add_output(parser: argparse.ArgumentParser, *, wait: bool = True) -> None:
    if wait:
        _add_timeout(parser, "waiting")
        parser.add_argument(
            "--out", metavar="DIR", help="download the images into DIR (created if needed)"
        )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (see --help)"
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    """The submission options: model, aspect ratio, resolution, count."""
    parser.add_argument(
        "--model",
        help="model name, e.g. nano-banana-pro (default: nano-banana); see 'nanobanana models'",
    )
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


def _add_submission(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what the image should show; '-' reads it from stdin")
    _add_options(parser)
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="print the task id (on stdout) and exit at once; wait later with 'tasks wait'",
    )
    _add_output(parser)


_BATCH_DESCRIPTION = """\
Make the images for every prompt of a file, with at most --max-in-flight tasks
pending at once, and save them into DIR as <line>-<index>.<ext>.

The batch is durable: a journal in DIR/.nanobanana/ records each submission before
it is sent and its task id as soon as the service answers, so running the same
command again resumes: finished jobs are skipped, tasks already submitted are waited
on (never paid for twice), the rest are submitted. A job whose outcome is unknown
(the process died during its submission) is reported with its prompt and submitted
again only with --resubmit-unknown. Ctrl-C and SIGTERM stop cleanly (exit 130, 143).

DIR/manifest.jsonl has one JSON line per job: key, action, prompt, options, state
(succeeded, failed, download_failed, pending, outcome_unknown), task_id, trace_id,
task_ids, attempts, image_urls, files, error.

A .jsonl PROMPTS file has one job per line:
  {"prompt": "...", "key": "cat-1", "image_urls": ["https://..."], "model": "...",
   "aspect_ratio": "16:9", "resolution": "2K", "count": 2}
(only "prompt" is required; with "image_urls" the job is an edit; the options given
on the command line are the defaults).

Exit codes: 0 every job succeeded; 1 some failed, or have an unknown outcome;
2 usage error (including a prompts file changed since the batch started);
3 an API error stopped the batch, or images could not be saved; 130/143 stopped.
"""


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
    wait.add_argument(
        "--not-found-grace",
        type=_non_negative_float,
        default=30.0,
        metavar="S",
        help="how long an id the service does not list yet is waited for before it counts "
        "as unknown (default: 30)",
    )
    download = task_commands.add_parser(
        "download",
        parents=[api],
        help="save the images of finished tasks",
        description="Read the tasks once and save the images of those that succeeded into "
        "DIR. Pending tasks are not waited for (exit code 4; 'tasks wait --out' waits).",
        epilog=_EPILOG,
        formatter_class=formatter,
    )
    download.add_argument(
        "ids", nargs="+", metavar="ID", help="task ids; '-' reads them from stdin"
    )
    download.add_argument(
        "--out", required=True, metavar="DIR", help="where to save the images (created if needed)"
    )
    _add_timeout(download, "saving")
    download.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout (see --help)"
    )

    batch = commands.add_parser(
        "batch",
        parents=[api],
        help="make images for a whole file of prompts, resumably",
        description=_BATCH_DESCRIPTION,
        formatter_class=formatter,
    )
    batch.add_argument(
        "prompts",
        metavar="PROMPTS",
        help="a file with one prompt per line ('#' starts a comment), a .jsonl file of jobs, "
        "or '-' for stdin",
    )
    batch.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the batch's folder: images, manifest.jsonl and the journal (.nanobanana/)",
    )
    batch.add_argument(
        "--max-in-flight",
        type=_positive_int,
        default=8,
        metavar="N",
        help="tasks pending at once (default: 8)",
    )
    batch.add_argument(
        "--retries",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="submit a job again up to N times when its task fails; each is paid "
        "(refused prompts are never retried; default: 0)",
    )
    batch.add_argument(
        "--resubmit-unknown",
        action="store_true",
        help="submit again the jobs whose outcome is unknown (a task may exist for them: "
        "each may be paid twice)",
    )
    batch.add_argument(
        "--no-download",
        action="store_true",
        help="do not save the images (the manifest lists their URLs)",
    )
    _add_options(batch)
    batch.add_argument(
        "--json", action="store_true", help="print the summary and every job as one JSON document"
    )

    models = commands.add_parser(
        "models",
        help="list the known models and the resolutions each honours",
        description="The models known to this version, with the resolutions each honours. "
        "Other model names are passed to the service as they are.",
    )
    models.add_argument("--json", action="store_true", help="print one JSON document")

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
        description="Run the fake server in the foreground until Ctrl-C or SIGTERM (then "
        "exit 0, after printing the requests it served by action as one line: "
        "'Requests served: {\"generate\": 3, ...}'). "
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
