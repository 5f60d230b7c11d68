"""The models the command line knows, and the resolutions each one honours.

From the API reference (the official SDK 2026.10 and its API spec). The list grows,
so it only informs: an unknown model name is passed to the service as it is, and the
service judges it.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

__all__ = ["DEFAULT_MODEL", "MODELS", "Model", "ignored_resolution"]


@attrs.frozen
class Model:
    """A model: its name, what it is, the resolutions it honours, whether it has an
    ``:official`` variant (better quality and stability, billed differently)."""

    name: str
    underlying: str
    resolutions: tuple[str, ...]
    official: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "underlying": self.underlying,
            "resolutions": list(self.resolutions),
            "official_variant": f"{self.name}:official" if self.official else None,
            "default": self.name == DEFAULT_MODEL,
        }


DEFAULT_MODEL: Final = "nano-banana"
_ALL: Final = ("1K", "2K", "4K")
MODELS: Final = (
    Model("nano-banana", "gemini-2.5-flash-image", ("1K",), official=True),
    Model("nano-banana-2-lite", "gemini-3.1-flash-lite-image", ("1K",), official=True),
    Model("nano-banana-2", "gemini-3.1-flash-image", _ALL, official=True),
    Model("nano-banana-2.1", "(newest)", _ALL, official=False),
    Model("nano-banana-pro", "gemini-3-pro-image", _ALL, official=True),
)
_BY_NAME: Final = {model.name: model for model in MODELS} | {
    f"{model.name}:official": model for model in MODELS if model.official
}


def ignored_resolution(model: str | None, resolution: str | None) -> str | None:
    """A warning when a known model is asked for a resolution it does not honour."""
    if resolution is None:
        return None
    known = _BY_NAME.get(model or DEFAULT_MODEL)
    if known is None or resolution in known.resolutions:
        return None
    return (
        f"{model or DEFAULT_MODEL} honours only {', '.join(known.resolutions)}: the service "
        f"may ignore --resolution {resolution} (see 'nanobanana models')"
    )
