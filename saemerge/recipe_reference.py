"""The recipe reference (field, default, meaning) generated from the pydantic schema in recipe.py.

The Field descriptions there are the single source of truth: `saemerge explain` prints this, and the README's
table is `saemerge explain --markdown` (a test fails when the two differ).
"""

from __future__ import annotations

import difflib
import re
import shutil
import textwrap
from types import UnionType
from typing import Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .recipe import Recipe, RecipeError


def _submodel(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(the nested spec, whether it is a list of them) for a section (an optional one too, such as `distill`);
    (None, False) for a leaf."""
    if get_origin(annotation) in (Union, UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else annotation
    is_list = get_origin(annotation) is list
    inner = get_args(annotation)[0] if is_list else annotation
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner, is_list
    return None, False


def _default(field) -> str:
    extra = field.json_schema_extra or {}
    if "default_text" in extra:  # a default that needs words, e.g. merge.inject's "all but the target"
        return extra["default_text"]
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, bool):
        return "true" if value else "false"  # as written in YAML
    return str(value)


def recipe_rows(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(field, default, meaning) for every leaf field, depth first in declaration order."""
    items = list(model.model_fields.items())
    if model is Recipe:
        # The top level reads best with the plain fields (name, output) first, then one section per stage.
        items.sort(key=lambda item: _submodel(item[1].annotation)[0] is not None)
    rows = []
    for name, field in items:
        sub, is_list = _submodel(field.annotation)
        if sub is not None:
            rows += recipe_rows(sub, f"{prefix}{name}{'[]' if is_list else ''}.")
        else:
            rows.append((prefix + name, _default(field), field.description or ""))
    return rows


def _key(name: str) -> str:
    # `models[].layer`, `models.layer` and `models.1.layer` (as error messages and --set write it) are one field.
    return re.sub(r"\.\d+(?=\.|$)", "", name.replace("[]", ""))


def _select(rows: list[tuple[str, str, str]], fields: list[str]) -> list[tuple[str, str, str]]:
    wanted, errors = set(), []
    for query in fields:
        q = _key(query)
        hits = {row[0] for row in rows if _key(row[0]) == q or _key(row[0]).startswith(q + ".")}
        if not hits:
            keys = {_key(row[0]): row[0] for row in rows}
            near = difflib.get_close_matches(q, keys, n=1)
            hint = f" (closest: {keys[near[0]]})" if near else ""
            tops = ", ".join(dict.fromkeys(key.split(".")[0] for key in keys))
            errors.append(f"explain: '{query}' is not a recipe field; expected one of {tops}, "
                          f"or a field inside one such as train.lr{hint}")
        wanted |= hits
    if errors:
        raise RecipeError(errors)
    return [row for row in rows if row[0] in wanted]


def _plain(text: str) -> str:
    """Markdown made terminal-friendly: a README link becomes its title."""
    return re.sub(r"\[([^]]+)\]\(#[^)]*\)", r'"\1" in the README', text)


def recipe_reference(markdown: bool = True, fields: list[str] | None = None) -> str:
    """Every recipe field with its default and meaning (or only `fields`: names or section prefixes).

    markdown=True gives the README table; False a plain-text form for the terminal.
    """
    rows = recipe_rows()
    if fields:
        rows = _select(rows, fields)
    if markdown:
        lines = ["| field | default | meaning |", "|---|---|---|"]
        lines += [f"| `{name}` | {default} | {meaning} |" for name, default, meaning in rows]
        return "\n".join(lines) + "\n"
    width = min(shutil.get_terminal_size((100, 24)).columns, 100)
    blocks = []
    for name, default, meaning in rows:
        default = default if default == "required" else f"default: {default}"
        blocks.append(f"{name}  ({default})\n" + textwrap.fill(_plain(meaning), width, initial_indent="    ",
                                                               subsequent_indent="    "))
    return "\n".join(blocks) + "\n"
