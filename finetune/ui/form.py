"""The Train page's form, generated from the recipe schema: one field per plain setting of the main
sections (the schema's description is its help text), read from a loaded recipe and turned back
into `key=value` overrides for what the user changed — the same overrides the command line takes,
so `finetune validate` judges them and `finetune train` runs them."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass

SECTIONS = ("model", "data", "training", "validation", "output")
SKIPPED = {"output.hooks", "model.flux"}  # a list of mappings; an older spelling of model.flow


@dataclass(frozen=True)
class FormField:
    key: str  # "training.learning_rate"
    kind: str  # "text" | "int" | "number" | "bool" | "choice" | "lines"
    help: str
    choices: tuple = ()
    optional: bool = False


def form_fields() -> list[FormField]:
    from ..recipe.schema import Recipe

    fields = []
    for section in SECTIONS:
        model = _plain(Recipe.model_fields[section].annotation)[0]
        for name, info in model.model_fields.items():
            key = f"{section}.{name}"
            kind, choices, optional = _kind(info.annotation)
            if kind and key not in SKIPPED:
                fields.append(FormField(key, kind, (info.description or "").strip(), choices, optional))
    return fields


def _plain(annotation):
    """(the type without None, whether None was allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _kind(annotation) -> tuple[str | None, tuple, bool]:
    t, optional = _plain(annotation)
    while typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return "choice", tuple(typing.get_args(t)), optional
    if origin is list and typing.get_args(t) and _kind(typing.get_args(t)[0])[0] in ("text", "choice"):
        return "lines", (), optional
    simple = {bool: "bool", int: "int", float: "number", str: "text"}
    return simple.get(t), (), optional


def values(recipe, fields: list[FormField]) -> list:
    """Each field's value in `recipe`, as its component shows it."""
    data = recipe.model_dump(mode="json")
    return [_shown(f, _get(data, f.key)) for f in fields]


def _get(data: dict, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _shown(f: FormField, value):
    if f.kind == "lines":
        return "\n".join(map(str, value or []))
    if f.kind in ("int", "number") and f.optional:  # a text box: empty is unset, which a number box cannot say
        return "" if value is None else str(value)
    if value is None:
        return "" if f.kind in ("text", "choice") else None
    return value


def overrides(recipe, fields: list[FormField], new_values: list) -> list[str]:
    """`key=value` for every field whose value differs from the recipe's (values as JSON, which the
    override parser reads as YAML, so any string stays a string)."""
    out = []
    for f, shown, new in zip(fields, values(recipe, fields), new_values):
        old, value = _parsed(f, shown), _parsed(f, new)
        if old != value:
            out.append(f"{f.key}={json.dumps(value)}")
    return out


def _parsed(f: FormField, value):
    """What a component's value means in the recipe (None: unset)."""
    if f.kind == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if f.kind in ("int", "number"):
        return _number(f, value)
    if f.kind in ("text", "choice") and value in ("", None):
        return None
    return value


def _number(f: FormField, value):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except ValueError:
        from ..errors import FinetuneError
        raise FinetuneError(f"{f.key}: {value!r} is not a number") from None
    return int(number) if f.kind == "int" and number == int(number) else number
