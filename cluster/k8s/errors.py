"""The one error of manifest rendering."""

from __future__ import annotations

__all__ = ["RenderError"]


class RenderError(ValueError):
    """Raised when a plan cannot be rendered into manifests as asked (the message names the option and the fix)."""
