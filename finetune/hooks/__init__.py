"""Output hooks: built-ins registered here, third-party ones found through the `finetune.hooks`
entry-point group (`my_hook = "my_package.module:MyHook"`, a `Hook` subclass)."""

from __future__ import annotations

from ..errors import FinetuneError
from ..registry import Registry
from .base import Hook, HookConfig, OutputImage, Provenance, Verdict

HOOKS: Registry[type[Hook]] = Registry("output hook", __name__)
register_hook = HOOKS.register
ENTRY_POINT_GROUP = "finetune.hooks"
# What runs when a recipe or command names no hooks: an invisible watermark naming the adapters,
# run and base model (its payload is in the `finetune_watermark` text chunk), provenance metadata,
# and signed C2PA Content Credentials over the final file.
DEFAULT_HOOKS: list[dict] = [{"type": "watermark"}, {"type": "provenance"}, {"type": "c2pa"}]

_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    HOOKS.discover()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in HOOKS.names():
            continue
        try:
            cls = ep.load()
        except Exception as e:  # a broken plug-in must not take the built-ins down with it
            raise FinetuneError(f"output hook {ep.name!r} ({ep.value}) failed to load: {e}") from e
        register_hook(ep.name)(cls)


def hook_class(name: str) -> type[Hook]:
    _load_entry_points()
    return HOOKS.get(name)


def hook_names() -> list[str]:
    _load_entry_points()
    return HOOKS.names()


def validate_hook_configs(configs: list) -> list[dict]:
    """Check each hook's type and options (for recipe validation); returns them with defaults filled."""
    out = []
    for i, raw in enumerate(configs):
        if not isinstance(raw, dict) or "type" not in raw:
            raise ValueError(f"{i}: a hook is a mapping with a type, e.g. {{type: provenance}}; known: {', '.join(hook_names())}")
        if raw["type"] not in hook_names():
            raise ValueError(f"{i}.type: unknown hook {raw['type']!r}; known: {', '.join(hook_names())}")
        try:
            out.append(hook_class(raw["type"]).Config.model_validate(raw).model_dump(mode="json"))
        except Exception as e:  # pydantic's message, one line per problem
            first = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
            raise ValueError(f"{i}: {first}") from None
    return out


def build_pipeline(configs: list[dict] | None, log=None):
    """The output pipeline for these hook configs (None: the defaults)."""
    from .pipeline import OutputPipeline

    if configs is None:
        configs = DEFAULT_HOOKS
    elif not configs and log:
        log("output hooks: all turned off (output.hooks: []); images carry no provenance, watermark or credentials")
    return OutputPipeline(build_hooks(configs))


def with_credential(configs: list[dict] | None, cert: str | None, key: str | None,
                    where: str = "--c2pa-cert/--c2pa-key") -> list[dict] | None:
    """`configs` (None: the defaults) with every c2pa hook signing with `cert`/`key` (both or neither)."""
    if not cert and not key:
        return configs
    if not cert or not key:
        raise FinetuneError(f"{where}: give both the certificate chain and the private key")
    configs = [dict(c) for c in (DEFAULT_HOOKS if configs is None else configs)]
    signing = [c for c in configs if c.get("type") == "c2pa"]
    if not signing:
        raise FinetuneError(f"{where}: no c2pa hook is on to sign with it (the hooks are: "
                            f"{', '.join(c.get('type', '?') for c in configs) or 'none'})")
    for c in signing:
        c.update(cert=str(cert), key=str(key))
    return configs


def build_hooks(configs: list[dict]) -> list[Hook]:
    hooks = []
    for raw in configs:
        cls = hook_class(raw["type"])
        hooks.append(cls(cls.Config.model_validate(raw)))
    return hooks


__all__ = ["Hook", "HookConfig", "OutputImage", "Provenance", "Verdict", "HOOKS", "DEFAULT_HOOKS",
           "register_hook", "hook_class", "hook_names", "build_hooks", "build_pipeline", "validate_hook_configs",
           "with_credential"]
