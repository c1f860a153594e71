"""Generated docs: the README's config example (default.yaml) and config reference, and the editor JSON Schema."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from deployments.config import ServingConfig

__all__ = [
    "DEFAULT_CONFIG",
    "EXAMPLE_MARKERS",
    "README_MARKERS",
    "config_example_markdown",
    "config_reference_markdown",
    "config_sections",
    "render_readme",
    "schema_json",
]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "deployments" / "configs" / "default.yaml"
README_MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")
EXAMPLE_MARKERS = ("<!-- config-example:start -->", "<!-- config-example:end -->")


def _nested_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """The config model a field holds, and whether it holds a list of them; None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        found = [nested for arg in args if arg is not type(None) and (nested := _nested_model(arg))]
        return found[0] if len(found) == 1 else None
    if isinstance(origin, type) and issubclass(origin, Sequence) and args:
        inner = _nested_model(args[0])
        return (inner[0], True) if inner else None
    return None


def config_sections() -> list[tuple[str, type[BaseModel]]]:
    """Every config model reachable from ServingConfig, depth first in field order: (title, model).

    A title is the model's path in a config (`models[].resources`); the root is 'top level'.
    """
    sections: list[tuple[str, type[BaseModel]]] = []

    def visit(path: str, model: type[BaseModel]) -> None:
        sections.append((f"`{path}`" if path else "top level", model))
        for name, field in model.model_fields.items():
            nested = _nested_model(field.annotation)
            if nested is not None:
                child, is_list = nested
                visit((f"{path}.{name}" if path else name) + ("[]" if is_list else ""), child)

    visit("", ServingConfig)
    return sections


def _type_name(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    if "anyOf" in schema:
        return " \\| ".join(_type_name(s) for s in schema["anyOf"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type_name(schema.get('items', {}))}"
    return str(kind)


def config_reference_markdown() -> str:
    """One table per config model (see `config_sections`): field, type, default, description."""
    sections = config_sections()
    titles = {model: title for title, model in sections}
    out: list[str] = []
    for title, model in sections:
        schema = model.model_json_schema()
        out += [f"**{title}**", "", "| field | type | default | description |", "|---|---|---|---|"]
        required = set(schema.get("required", []))
        for name, prop in schema["properties"].items():
            field = model.model_fields[name]
            nested = _nested_model(field.annotation)
            if name in required:
                default = "required"
            elif nested is not None and not nested[1]:
                default = f"see {titles[nested[0]]}"  # its own table: every field at its default
            else:
                value = prop["default"] if "default" in prop else field.get_default(call_default_factory=True)
                default = f"`{json.dumps(to_jsonable_python(value))}`"
            desc = (field.description or "").replace("|", "\\|")
            out.append(f"| `{name}` | {_type_name(prop)} | {default} | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def config_example_markdown() -> str:
    """The default config, verbatim, as a YAML code block."""
    text = DEFAULT_CONFIG.read_text()
    return f"```yaml\n{text.rstrip()}\n```\n"


def _between(text: str, markers: tuple[str, str], body: str) -> str:
    start, end = markers
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def render_readme(text: str) -> str:
    """The README text with its config example and config reference regenerated."""
    text = _between(text, EXAMPLE_MARKERS, config_example_markdown())
    return _between(text, README_MARKERS, config_reference_markdown())


def schema_json() -> str:
    """ServingConfig's JSON Schema, as written to deployments/configs/schema.json."""
    return json.dumps(ServingConfig.model_json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(render_readme(readme.read_text()))
    (ROOT / "deployments" / "configs" / "schema.json").write_text(schema_json())
