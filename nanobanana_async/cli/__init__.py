"""The ``nanobanana`` command line of nanobanana-async (install the ``cli`` extra).

Commands: generate, edit, tasks get, tasks wait, demo and fake-server;
"nanobanana COMMAND --help" tells more about each.

The token and base URL come from --token / --base-url, else from the
ACEDATACLOUD_API_TOKEN / ACEDATACLOUD_API_BASE_URL environment variables.

Output: tables and image URLs (or saved files) on stdout; progress, notes and
errors on stderr. With --json, stdout holds exactly one JSON document, the same
shape for every command:

  {"tasks": [{"id": "...",
              "state": "pending" | "succeeded" | "failed" | "not_found",
              "image_urls": ["https://..."],
              "error": {"code": "...", "message": "..."} or null,
              "files": ["path/to/saved.png"],
              "elapsed": 12.3 or null}]}

Tasks are listed in the order they were given. "files" lists images saved with
--out; "elapsed" is the service's own seconds from start to finish. When a
command ends with exit code 2 or 3 before any task was read, stdout is empty.

Exit codes:
  0    success (for "tasks get": every task known and none failed)
  1    a task failed
  2    usage error: bad arguments, a missing or unusable image file or folder
  3    API or auth error (including no token, unknown task ids, failed downloads)
  4    timeout: tasks still pending when --timeout ran out (they keep running)
  130  interrupted with Ctrl-C (the tasks keep running; the message says how to
       wait for them again); "fake-server" exits 0 when stopped with Ctrl-C
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
