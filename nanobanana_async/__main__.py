"""``python -m nanobanana_async``: the same as the ``nanobanana`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
