"""The config reference in the README and the editor JSON Schema, both generated from the pydantic schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from deployments.config import RouterConfig, ServingConfig
from models.spec import BatchingConfig, ModelSpec, ResourcesConfig, ScalingConfig

__all__ = ["README_MARKERS", "config_reference_markdown", "render_readme", "schema_json"]

ROOT = Path(__file__).resolve().parent.parent
README_MARKERS = ("<!-- config-reference:start -->", "<!-- config-reference:end -->")
_SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", ServingConfig),
    ("`models[]`", ModelSpec),
    ("`models[].resources`", ResourcesConfig),
    ("`models[].scaling`", ScalingConfig),
    ("`models[].batching`", BatchingConfig),
    ("`router`", RouterConfig),
]


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
    """One table per schema section: field, type, default, description."""
    out: list[str] = []
    for title, model in _SECTIONS:
        schema = model.model_json_schema()
        out += [f"**{title}**", "", "| field | type | default | description |", "|---|---|---|---|"]
        required = set(schema.get("required", []))
        for name, prop in schema["properties"].items():
            field = model.model_fields[name]
            if name in required:
                default = "required"
            elif field.default_factory is not None:
                default = "see below" if "$ref" in prop else "`[]`/`{}`"
            else:
                default = f"`{json.dumps(field.default)}`"
            desc = (field.description or "").replace("|", "\\|")
            out.append(f"| `{name}` | {_type_name(prop)} | {default} | {desc} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_readme(text: str) -> str:
    """The README text with its config-reference section regenerated."""
    start, end = README_MARKERS
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{config_reference_markdown()}{end}{tail}"


def schema_json() -> str:
    """ServingConfig's JSON Schema, as written to deployments/configs/schema.json."""
    return json.dumps(ServingConfig.model_json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(render_readme(readme.read_text()))
    (ROOT / "deployments" / "configs" / "schema.json").write_text(schema_json())
