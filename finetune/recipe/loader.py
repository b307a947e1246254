"""YAML recipes -> validated `Recipe`: `extends:` inheritance, key.path=value overrides, and
error messages that name the file, the key path and what would be valid."""

from __future__ import annotations

import copy
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import RecipeError, safe_name
from .schema import Recipe

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# A recipe holds a few hundred values. YAML aliases can make a few hundred bytes stand for billions
# ("billion laughs"): PyYAML shares the aliased objects, so loading is cheap, but validating,
# printing or dumping them walks every copy.
MAX_VALUES = 100_000
MAX_DEPTH = 64
MAX_LINE = 300  # characters of one error line, whatever a validator put in it

_short_repr = reprlib.Repr()
_short_repr.maxlevel, _short_repr.maxlist, _short_repr.maxdict = 2, 4, 4
_short_repr.maxstring = _short_repr.maxlong = _short_repr.maxother = 60


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


def excerpt(value, limit: int = 60) -> str:
    """A short repr of any value, however large or deeply nested (reprlib stops early)."""
    try:
        text = _short_repr.repr(value)
    except ValueError:  # an int past Python's 4300-digit str limit
        text = f"<a {value.bit_length()}-bit number>" if isinstance(value, int) else f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}..."


def _cut(text: str, limit: int = 80) -> str:
    """User text for a message, unquoted: escaped control characters, at most `limit` characters."""
    text = safe_name(text)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError([f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([f"{path}: cannot read ({e})"]) from None
    except RecursionError:
        raise RecipeError([f"{path}: nested too deeply to be a recipe"]) from None
    except ValueError as e:  # a value PyYAML parses but cannot build: 2024-13-45, an int of 5000 digits
        raise RecipeError([f"{path}: a value in it cannot be read ({excerpt(str(e), 80)})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe is a mapping of sections (model:, data:, ...), not {type(data).__name__}"])
    _check_size(data, path)
    return data


def _check_size(data: dict, path: Path) -> None:
    """Refuse YAML whose aliases expand past MAX_VALUES values, refer to themselves, or nest past
    MAX_DEPTH. Each distinct object is counted once (memo by id), so this costs the file's size."""
    sizes: dict[int, int | None] = {}

    def size(node, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            if sizes[id(node)] is None:
                raise RecipeError([f"{path}: a YAML alias refers to itself (a value that would never end)"])
            return sizes[id(node)]
        if depth > MAX_DEPTH:
            raise RecipeError([f"{path}: nested more than {MAX_DEPTH} levels deep; a recipe needs a few"])
        sizes[id(node)] = None
        children = node.values() if isinstance(node, dict) else node
        sizes[id(node)] = 1 + sum(size(child, depth + 1) for child in children)
        return sizes[id(node)]

    total = size(data, 0)
    if total > MAX_VALUES:
        raise RecipeError([f"{path}: its YAML aliases (&name / *name) expand to more than {MAX_VALUES:,} values; "
                           "a recipe holds a few hundred"])


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
        raise RecipeError([f"{path}: extends: expected a recipe path or name, got {excerpt(parent)}"])
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
    merged: dict[str, str] = {}
    for e in err.errors():
        path, msg, union = _problem(e, data)
        if union and path in merged:  # a value every member of a union refused (auto, or a number): one line
            msg = f"{merged[path].rsplit(' (got ', 1)[0]}, or {msg.removeprefix('expected ')}"
        merged[path] = msg
    lines = [f"{source}: {path}: {msg}" for path, msg in merged.items()]
    return [line if len(line) <= MAX_LINE else f"{line[:MAX_LINE]}..." for line in lines]


def _problem(e: dict, data: dict) -> tuple[str, str, bool]:
    """(key path, message, whether it is one member's error of a plain union) for one pydantic error."""
    from ..methods import METHODS

    tags = set(METHODS.names())
    # Discriminated unions put the tag in the path (method.lora.rank): drop it for users. Plain
    # unions put their member's label last ("literal['auto']", "constrained-float"): drop that too.
    loc = tuple(str(p) for i, p in enumerate(e["loc"]) if not (i == 1 and e["loc"][0] == "method" and p in tags))
    kind = e["type"]
    # (an unknown key's name is the user's, and may hold any character)
    union = kind != "extra_forbidden" and bool(loc) and re.search(r"[^\w]", loc[-1]) is not None
    loc = loc[:-1] if union else loc
    path = ".".join(loc) or "(top level)"
    got = f"(got {excerpt(e.get('input'))})"
    if kind == "extra_forbidden":
        valid = _valid_keys(Recipe, tuple(p for p in loc if not p.isdigit()), data)
        msg = f"unknown key; valid keys here: {', '.join(valid)}" if valid else "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind in ("too_short", "string_too_short"):
        unit = "character" if kind.startswith("string") else "item"
        msg = f"expected at least {e['ctx']['min_length']} {unit} {got}"
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
    else:  # literal_error, enum, numbers out of range, wrong types
        msg = f"{e['msg'].replace('Input should be', 'expected')} {got}"
    return path, msg, union


def validate(data: dict, source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(err, source, data)) from None


def reference_problems(recipe: Recipe, base_dir: Path | None) -> list[str]:
    """`key.path: message` for what the recipe points at that is not there (nothing is loaded)."""
    from ..data.sources import looks_like_hub_dataset, resolve_data_path
    from ..families.base import base_problem, vae_problem

    problems = []
    base = base_problem(recipe.model.base, recipe.model.allow_pickle, offline_cache=False)
    if base:
        problems.append(f"model.base: {base}")
    vae = recipe.model.vae and vae_problem(recipe.model.vae, offline_cache=False)
    if vae:
        problems.append(f"model.vae: {vae}")
    raw = recipe.data.path
    # A hub dataset name is checked when the data is read (still before any model loads): offline,
    # `datasets` may have it cached.
    data = resolve_data_path(raw, base_dir)
    if not data.exists() and not looks_like_hub_dataset(raw):
        where = f" (nor in {base_dir})" if base_dir else ""
        problems.append(f"data.path: {_cut(raw)} does not exist here{where}")
    elif data.is_file() and data.suffix.lower() not in (".jsonl", ".csv"):
        problems.append(f"data.path: {_cut(raw)} is a file; expected a folder of images, a metadata.jsonl/.csv "
                        "file or a dataset name")
    return problems


def method_problems(recipe: Recipe) -> list[str]:
    """The family x method pair, where the family is known before loading: a pair that cannot train
    is refused in one line naming what can."""
    from ..families import known_family

    family = known_family(recipe.model)
    why = family.method_problem(recipe.method) if family else None
    return [why] if why else []


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Load, inherit, override and validate a recipe, and check what it points at exists, before
    any model loads. Returns the recipe and its file's path."""
    file = find_recipe(path)
    data = apply_overrides(load_raw(file), overrides or [])
    recipe = validate(data, str(file))
    problems = reference_problems(recipe, file.parent) + method_problems(recipe)
    if problems:
        raise RecipeError([f"{file}: {p}" for p in problems])
    return recipe, file


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, every default spelled out, to reproduce a run."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
