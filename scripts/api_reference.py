"""Write docs/api.md from the service's OpenAPI document, so the reference cannot drift from
the code (tests/test_project_rules.py checks it is current).

Usage: .venv/bin/python scripts/api_reference.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "api.md"


def render(spec: dict[str, Any]) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the service's OpenAPI document by `scripts/api_reference.py`; the live",
        "document is served at `/openapi.json` (and browsable at `/docs`). Every error is a FHIR",
        "`OperationOutcome`. Configuration and behaviour: [service.md](service.md).",
        "",
    ]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            lines += [f"## `{method.upper()} {path}`", ""]
            lines += [_one_paragraph(op.get("description") or op.get("summary") or ""), ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | required | meaning |", "|---|---|---|---|"]
                for p in params:
                    meaning = _one_paragraph(
                        p.get("description") or p["schema"].get("description", "")
                    )
                    required = "yes" if p.get("required") else "no"
                    lines.append(_row(f"`{p['name']}`", p["in"], required, meaning))
                lines.append("")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if body:
                lines += [f"Body: `{_schema_name(body['schema'])}`.", ""]
            lines += ["| status | meaning | body |", "|---|---|---|"]
            for status, response in op["responses"].items():
                content: dict[str, Any] = response.get("content", {})
                first: dict[str, Any] = next(iter(content.values()), {})
                schema: dict[str, Any] = first.get("schema", {})
                meaning = _one_paragraph(response.get("description", ""))
                lines.append(_row(status, meaning, f"`{_schema_name(schema)}`"))
            lines.append("")
    lines += ["## Schemas", ""]
    for name, schema in sorted(spec["components"]["schemas"].items()):
        fields = schema.get("properties", {})
        if not fields:
            continue
        lines += [f"### `{name}`", ""]
        if schema.get("description"):
            lines += [_one_paragraph(schema["description"]), ""]
        lines += ["| field | type | meaning |", "|---|---|---|"]
        needed = set(schema.get("required", []))
        for field, sub in fields.items():
            mark = "" if field in needed else " (optional)"
            meaning = _one_paragraph(sub.get("description", ""))
            lines.append(_row(f"`{field}`{mark}", f"`{_schema_name(sub)}`", meaning))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def _one_paragraph(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _schema_name(schema: dict[str, Any] | bool) -> str:
    if not isinstance(schema, dict):
        return "any"
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_schema_name(schema.get('items', {}))}]"
    if schema.get("type") == "object" and "additionalProperties" in schema:
        return f"map[{_schema_name(schema['additionalProperties'])}]"
    if "enum" in schema:
        return " | ".join(str(v) for v in schema["enum"])
    if "const" in schema:
        return str(schema["const"])
    return str(schema.get("type", "any"))


def main() -> int:
    spec = create_app(Settings()).openapi()
    text = render(spec)
    if "--check" in sys.argv:
        if TARGET.read_text() != text:
            print("docs/api.md is out of date: run scripts/api_reference.py")
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
