"""Check what the built sdist and wheel hold: what the package needs, nothing of the clone's
clutter. Usage: ``python .ci/check_dist.py DIST_FOLDER`` (run by .ci/run after the build)."""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

WHEEL_NEEDS = [
    "nanobanana_async/__init__.py",
    "nanobanana_async/__main__.py",
    "nanobanana_async/py.typed",
    "nanobanana_async/pytest_plugin.py",
    "nanobanana_async/testing.py",
    "nanobanana_async/webhooks.py",
    "nanobanana_async/cli/__init__.py",
]
SDIST_NEEDS = [
    "pyproject.toml",
    "README.md",
    "CHANGELOG.md",
    "LICENSE",
    "mkdocs.yml",
    "docs/index.md",
    "tests/conftest.py",
    *WHEEL_NEEDS,
]
ENTRY_POINTS = [
    "[console_scripts]\nnanobanana = nanobanana_async.cli:main",
    "[pytest11]\nnanobanana = nanobanana_async.pytest_plugin",
]
# Never shipped: environments, caches, build output, the built docs site.
CLUTTER = {
    ".venv",
    ".ci-venv",
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".import_linter_cache",
    "site",
    "dist",
    "build",
    ".git",
}


def main(folder: Path) -> list[str]:
    (wheel,) = folder.glob("*.whl")
    (sdist,) = folder.glob("*.tar.gz")
    problems: list[str] = []

    with zipfile.ZipFile(wheel) as archive:
        wheel_names = archive.namelist()
        (entry_points,) = (n for n in wheel_names if n.endswith(".dist-info/entry_points.txt"))
        entry_text = archive.read(entry_points).decode()
    problems += [f"wheel lacks {name}" for name in WHEEL_NEEDS if name not in wheel_names]
    problems += [f"wheel entry points lack {ep!r}" for ep in ENTRY_POINTS if ep not in entry_text]
    problems += [
        f"wheel holds {name}, outside the package"
        for name in wheel_names
        if not name.startswith(("nanobanana_async/", "nanobanana_async-"))
    ]

    with tarfile.open(sdist) as archive:
        # Every member sits in one top folder, "nanobanana_async-VERSION/".
        sdist_names = [str(PurePosixPath(*PurePosixPath(n).parts[1:])) for n in archive.getnames()]
    problems += [f"sdist lacks {name}" for name in SDIST_NEEDS if name not in sdist_names]

    for kind, names in (("wheel", wheel_names), ("sdist", sdist_names)):
        for name in names:
            parts = PurePosixPath(name).parts
            if CLUTTER.intersection(parts) or name.endswith((".pyc", ".pyo")):
                problems.append(f"{kind} holds {name}")
    print(f"{wheel.name}: {len(wheel_names)} files; {sdist.name}: {len(sdist_names)} files")
    return problems


if __name__ == "__main__":
    found = main(Path(sys.argv[1]))
    for problem in found:
        print(f"check_dist: {problem}", file=sys.stderr)
    sys.exit(1 if found else 0)
