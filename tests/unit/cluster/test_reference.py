"""The README's config example and reference, and schema.json, against the schema and the default config."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cluster.reference import (
    EXAMPLE_MARKERS,
    README_MARKERS,
    config_reference_markdown,
    config_sections,
    render_readme,
    schema_json,
)
from deployments.config import ServingConfig

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
REGENERATE = "run `make docs` (python -m cluster.reference) to regenerate it"


def _between(text: str, markers: tuple[str, str]) -> str:
    start, end = markers
    assert text.count(start) == 1 and text.count(end) == 1, f"the README needs exactly one {start} ... {end}"
    return text.split(start, 1)[1].split(end, 1)[0]


def _rows(markdown: str) -> dict[str, dict[str, str]]:
    """Each table of the reference as {field: its row}, in order, by section title."""
    out: dict[str, dict[str, str]] = {}
    for block in markdown.split("\n**"):
        title, _, body = block.lstrip("*").partition("**")
        out[title] = {m[1]: m[0] for m in re.finditer(r"^\| `([^`]+)` \|.*$", body, flags=re.MULTILINE)}
    return out


def test_readme_example_is_the_default_config() -> None:
    example = _between(README.read_text(), EXAMPLE_MARKERS)
    default = (ROOT / "deployments" / "configs" / "default.yaml").read_text()
    assert example == f"\n```yaml\n{default.rstrip()}\n```\n", f"the README's example is not default.yaml: {REGENERATE}"


def test_readme_config_reference_is_fresh() -> None:
    readme = README.read_text()
    assert _between(readme, README_MARKERS) == f"\n{config_reference_markdown()}", f"stale reference: {REGENERATE}"
    assert render_readme(readme) == readme, REGENERATE


def test_schema_json_in_sync() -> None:
    committed = (ROOT / "deployments" / "configs" / "schema.json").read_text()
    assert json.loads(committed) == json.loads(schema_json()), "run `make docs` to regenerate schema.json"


def test_reference_documents_every_config_model_and_field() -> None:
    sections = config_sections()
    documented = {model.__name__ for _, model in sections}
    assert documented == {"ServingConfig", *ServingConfig.model_json_schema()["$defs"]}
    assert [title for title, _ in sections][:2] == ["top level", "`models[]`"]
    assert {
        "`models[].resources`",
        "`models[].scaling`",
        "`models[].batching`",
        "`models[].parallelism`",
        "`router`",
    } <= {title for title, _ in sections}
    tables = _rows(config_reference_markdown())
    assert list(tables) == [title for title, _ in sections]
    for title, model in sections:
        assert list(tables[title]) == list(model.model_fields), title


def test_reference_defaults_read_as_values() -> None:
    rows = {
        (title, field): row
        for title, rows_of in _rows(config_reference_markdown()).items()
        for field, row in rows_of.items()
    }
    assert "| `{}` |" in rows[("`models[]`", "engine_kwargs")]
    assert "| `[]` |" in rows[("`router`", "api_keys")]
    assert "| see `models[].parallelism` |" in rows[("`models[]`", "parallelism")]
    assert "| see `router` |" in rows[("top level", "router")]
    assert "| required |" in rows[("`models[]`", "id")]
    assert all("see below" not in row and "`[]`/`{}`" not in row for row in rows.values())
