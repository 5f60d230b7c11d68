"""The ``nanobanana`` command line of nanobanana-async (install the ``cli`` extra).

Commands: generate, edit, batch, tasks get, tasks wait, tasks download, models,
demo and fake-server; "nanobanana COMMAND --help" tells more about each.

The token and base URL come from --token / --base-url, else from the
ACEDATACLOUD_API_TOKEN / ACEDATACLOUD_API_BASE_URL environment variables.

Output: image URLs (or saved files, or the ids of tasks with neither) on stdout;
progress, notes and errors on stderr. The id of every submitted task is written to
stderr as soon as the service answers. With --json, stdout holds exactly one JSON
document, the same shape for every command but batch and models:

  {"tasks": [{"id": "...",
              "state": "pending" | "succeeded" | "failed" | "not_found",
              "prompt": "..." or null,
              "image_urls": ["https://..."],
              "error": {"code": "...", "message": "..."} or null,
              "files": ["path/to/saved.png"],
              "elapsed": 12.3 or null}]}

Tasks are listed in the order they were given. "files" lists images saved with
--out; "elapsed" is the service's own seconds from start to finish. "error" is the
task's failure, or on a task that succeeded or is pending what went wrong here
("download_failed", "incomplete": not every image was saved, "read_failed"). Whatever
ends a command once a task was submitted or read (a failed download, an unknown id,
a timeout, Ctrl-C, SIGTERM), stdout still gets every task read so far; it is empty
only when the command ends before any.

Exit codes:
  0    success (for "tasks get": every task known and none failed)
  1    a task failed
  2    usage error: bad arguments, a missing or unusable image file or folder
  3    API or auth error (including no token, unknown task ids, failed downloads)
  4    timeout: tasks still pending, or images not saved, when --timeout ran out
       (the tasks keep running); for "tasks download", tasks still pending
  130  interrupted with Ctrl-C, 143 stopped with SIGTERM (the tasks keep running;
       the message says how to wait for them again); "fake-server" exits 0
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    try:
        import rich  # noqa: F401  (only checking that the optional extra is there)
    except ImportError:
        sys.stderr.write(
            "nanobanana: error: the command line needs the 'rich' package: "
            "pip install 'nanobanana-async[cli]'\n"
        )
        return 2
    from ._main import run

    return run(argv)
