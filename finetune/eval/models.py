"""The metric models a measurement needs, loaded once: CLIP, DINOv2 and (asked for) Inception.

Names are what `validation.metric_models` holds: hub ids (downloaded once into the Hugging Face
cache), local folders, or `builtin:tiny-clip` / `builtin:tiny-dinov2` (built locally, for tests and
the quickstart). A model that cannot be had is recorded with its reason in `missing`, never raised:
its metrics are then reported as missing, not as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .metrics import MetricModel, load_metric_model

INCEPTION = "inception"


@dataclass
class MetricModels:
    clip: MetricModel | None = None
    dino: MetricModel | None = None
    inception: Any = None  # torchmetrics' NoTrainInceptionV3 (2048 pool features), or None
    names: dict[str, str] = field(default_factory=dict)  # kind -> what was asked for (eval.json records it)
    missing: dict[str, str] = field(default_factory=dict)  # kind -> why it is not here

    def to(self, device) -> MetricModels:
        for m in (self.clip, self.dino):
            if m is not None:
                m.model.to(device)
        if self.inception is not None:
            self.inception.to(device)
        return self


def resolve_name(name: str) -> str:
    """A hub id or folder as given; `builtin:NAME` -> the built folder (built on first use)."""
    from ..tiny_models import BUILTIN_PREFIX, resolve_builtin

    return str(resolve_builtin(name[len(BUILTIN_PREFIX):])) if name.startswith(BUILTIN_PREFIX) else name


def load_metric_models(cfg, kinds: set[str], log=print) -> MetricModels:
    """The models of `kinds` ("clip", "dino", "inception") as `cfg` (a MetricModelsConfig) names them,
    on the CPU in fp32; one line for each that could not be loaded."""
    models = MetricModels()
    for kind in ("clip", "dino"):
        if kind not in kinds:
            continue
        name = getattr(cfg, kind)
        models.names[kind] = name
        loaded, reason = load_metric_model(kind, resolve_name(name))
        setattr(models, kind, loaded)
        if loaded is None:
            models.missing[kind] = reason
    if INCEPTION in kinds:
        models.names[INCEPTION] = "torch-fidelity inception-v3-compat"
        models.inception, reason = load_inception() if cfg.inception else (None, (
            "Inception FID is off: its weights are a pickled .pth file (torch-fidelity); set "
            "validation.metric_models.inception: true (or --inception) to allow it. FD-DINOv2 is reported instead"))
        if models.inception is None:
            models.missing[INCEPTION] = reason
    for kind, reason in models.missing.items():
        if kind != INCEPTION or cfg.inception:
            log(f"warning: {reason}")
    return models


def load_inception() -> tuple[Any, str]:
    """The FID Inception (the TF-ported weights torch-fidelity publishes), through torchmetrics."""
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics' NoTrainInceptionV3 is built on it
    except ImportError:
        return None, "inception metric model unavailable: torch-fidelity is not installed (pip install torch-fidelity)"
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).eval(), ""
    except Exception as e:  # noqa: BLE001 - offline download, a damaged file: the metric is skipped, not the eval
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, f"inception metric model unavailable: its weights could not be loaded ({first})"
