"""Manifests as text: deterministic YAML (key order as built, block literals for multi-line strings)."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["dump"]

_WIDTH = 120


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (serveConfigV2) as `|` blocks and indents lists under keys."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(obj: Any, *, header: str = "") -> str:
    """One YAML document, with `header` (lines of text) as leading comments."""
    text = yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=_WIDTH, allow_unicode=True, default_flow_style=False)
    return _comment(header) + text


def _comment(header: str) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
