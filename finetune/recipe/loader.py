"""YAML recipes -> validated `Recipe`: `extends:` inheritance, key.path=value overrides, and
error messages that name the file, the key path and what would be valid."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import RecipeError
from .schema import Recipe

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def recipe_dirs() -> list[Path]:
    """Where bundled recipes are looked up by name: ./recipes first, then the toolkit's own."""
    dirs = [Path.cwd() / "recipes", REPO_RECIPES]
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def find_recipe(name: str | Path, relative_to: Path | None = None) -> Path:
    """A path as given, relative to another recipe, or a bundled recipe's name (with or without .yaml)."""
    p = Path(name)
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to / p)
    for d in recipe_dirs():
        candidates += [d / p, d / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    bundled = ", ".join(sorted(r.stem for d in recipe_dirs() for r in d.glob("*.yaml")))
    raise RecipeError([f"{name}: recipe not found (not a file, and not a bundled recipe: {bundled})"])


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError([f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([f"{path}: cannot read ({e})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe is a mapping of sections (model:, data:, ...), not {type(data).__name__}"])
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """`over` wins; mappings merge key by key, anything else (lists included) is replaced. A mapping
    whose `type` changes (method: lora -> dreambooth) replaces the base's: other types' keys would
    not be valid in it."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and v.get("type", out[k].get("type")) == out[k].get("type"):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The recipe as a dict with every `extends:` resolved (the base first, this file on top)."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise RecipeError([f"{path}: extends: cycle ({cycle})"])
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError([f"{path}: extends: expected a recipe path or name, got {parent!r}"])
    base = load_raw(find_recipe(parent, relative_to=path.parent), (*_chain, path))
    return deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError([f"override {text!r}: expected key.path=value, e.g. training.max_steps=100"])
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError([f"override {text!r}: empty key path"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        if keys[-1] == "type" and isinstance(node.get("type"), str) and node["type"] != value:
            # As with `extends:`: another type's keys would not be valid in it (method.type=dreambooth).
            node.clear()
        node[keys[-1]] = value
    return data


def _valid_keys(model_cls, loc: tuple, data: dict) -> list[str]:
    """The field names allowed at `loc` (for 'unknown key' messages)."""
    from pydantic import BaseModel

    from ..methods import METHODS

    if loc[:1] == ("method",) and len(loc) == 2:
        kind = (data.get("method") or {}).get("type", "lora")
        if kind in METHODS.names():
            return sorted(METHODS.get(kind).Config.model_fields)
    cls = model_cls
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for a in candidates:
            for inner in (a, *getattr(a, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    cls = inner
                    break
            else:
                continue
            break
        else:
            return []
    return sorted(getattr(cls, "model_fields", {}))


def format_errors(err: ValidationError, source: str, data: dict) -> list[str]:
    from ..methods import METHODS

    tags = set(METHODS.names())
    lines = []
    for e in err.errors():
        # Discriminated unions put the tag in the path (method.lora.rank): drop it for users.
        loc = tuple(str(p) for i, p in enumerate(e["loc"]) if not (i == 1 and e["loc"][0] == "method" and p in tags))
        path = ".".join(str(p) for p in loc) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            valid = _valid_keys(Recipe, tuple(p for p in loc if not p.isdigit()), data)
            hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
            msg = f"unknown key{hint}"
        elif kind in ("literal_error", "enum"):
            msg = f"{e['msg'].replace('Input should be', 'expected')} (got {e.get('input')!r})"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "union_tag_invalid":
            path += ".type"
            msg = f"unknown type {e['ctx'].get('tag')!r}; expected one of {e['ctx'].get('expected_tags')}"
        elif kind == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            # Cross-field checks name the key they are about as "key.path: message".
            named = re.match(r"^([a-z_0-9]+(?:\.[a-z_0-9]+)*): ", msg)
            if named:
                path = f"{path}.{named.group(1)}" if e["loc"] else named.group(1)
                msg = msg[named.end():]
        else:
            msg = f"{e['msg']} (got {e.get('input')!r})"
        lines.append(f"{source}: {path}: {msg}")
    return lines


def validate(data: dict, source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(err, source, data)) from None


def reference_problems(recipe: Recipe, base_dir: Path | None) -> list[str]:
    """`key.path: message` for what the recipe points at that is not there (nothing is loaded)."""
    from ..data.sources import looks_like_hub_dataset, resolve_data_path
    from ..families.base import base_problem

    problems = []
    base = base_problem(recipe.model.base, recipe.model.allow_pickle, offline_cache=False)
    if base:
        problems.append(f"model.base: {base}")
    raw = recipe.data.path
    # A hub dataset name is checked when the data is read (still before any model loads): offline,
    # `datasets` may have it cached.
    if not resolve_data_path(raw, base_dir).exists() and not looks_like_hub_dataset(raw):
        where = f" (nor in {base_dir})" if base_dir else ""
        problems.append(f"data.path: {raw} does not exist here{where}")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Load, inherit, override and validate a recipe, and check what it points at exists, before
    any model loads. Returns the recipe and its file's path."""
    file = find_recipe(path)
    data = apply_overrides(load_raw(file), overrides or [])
    recipe = validate(data, str(file))
    problems = reference_problems(recipe, file.parent)
    if problems:
        raise RecipeError([f"{file}: {p}" for p in problems])
    return recipe, file


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, every default spelled out, to reproduce a run."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
