"""``python -m nanobanana_async.cli``: the same as the ``nanobanana`` command."""

from . import main

raise SystemExit(main())
