"""Image metrics on lists of PIL images, each computed with a loaded metric model.

- `clip_score`: prompt fidelity, 100 * max(cos(image, prompt), 0) (Hessel et al. 2021, "CLIPScore",
  arXiv:2104.08718, with w = 100 as torchmetrics' CLIPScore and SimpleTuner use).
- `clip_i`, `dino_similarity`: subject fidelity, mean cosine similarity of every generated image to
  every reference image, on CLIP image embeddings / DINO CLS embeddings (Ruiz et al. 2023,
  "DreamBooth", arXiv:2208.12242, section 4.1).
- `frechet_distance`, `kid`: distribution distances on features (FID on Inception features,
  FD-DINOv2 on DINOv2 ones), through torchmetrics' own implementations.
- `pairwise_diversity`: mean pairwise cosine distance within one set (mode collapse shows as ~0).

Metric models load with `load_metric_model`, which never raises for a model that is not there: it
returns None and the reason, so a caller records the metric as missing instead of as 0.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it runs: importing this module must stay cheap
    import torch

# Fréchet distance fits a full covariance per set: with fewer samples than this the covariance is
# rank-deficient and the value is dominated by estimation noise (FID is biased up for small n; the
# literature uses 10k-50k). KID is unbiased and is the one to use for small sets.
MIN_IMAGES_FOR_FD = 50

METRIC_KINDS = ("clip", "dino")


@dataclass(frozen=True)
class MetricModel:
    """A loaded metric model and the processor that prepares its inputs."""
    kind: str
    model: Any
    processor: Any


def load_metric_model(kind: str, name_or_path: str) -> tuple[MetricModel | None, str]:
    """Load a `kind` ("clip" or "dino") metric model from a hub id or a local folder.

    Returns (model, "") or (None, reason): offline with the model not cached, or a folder that does
    not hold one, is a reason to skip the metric, not an error."""
    if kind not in METRIC_KINDS:
        raise ValueError(f"unknown metric model kind {kind!r}; kinds: {', '.join(METRIC_KINDS)}")
    try:
        model, processor = _load(kind, name_or_path)
    except (OSError, ValueError) as error:  # transformers raises OSError for missing/offline files
        return None, _missing_reason(kind, name_or_path, error)
    return MetricModel(kind, model.eval(), processor), ""


def _load(kind: str, name_or_path: str):
    if kind == "clip":
        from transformers import CLIPModel, CLIPProcessor
        return CLIPModel.from_pretrained(name_or_path), CLIPProcessor.from_pretrained(name_or_path)
    from transformers import AutoImageProcessor, Dinov2Model
    return Dinov2Model.from_pretrained(name_or_path), AutoImageProcessor.from_pretrained(name_or_path)


def _missing_reason(kind: str, name_or_path: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if os.path.isdir(name_or_path):
        where = f"the folder {name_or_path} does not hold a {kind} model"
    elif _offline():
        where = f"{name_or_path!r} is not in the model cache and the hub is offline (HF_HUB_OFFLINE)"
    else:
        where = f"{name_or_path!r} could not be loaded"
    return f"{kind} metric model unavailable: {where} ({first_line})"


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


# --- embeddings -------------------------------------------------------------------------------


def clip_image_embeddings(model, processor, images) -> torch.Tensor:
    """Projected CLIP image embeddings (the ones CLIP compares with text), unit length."""
    import torch

    inputs = processor(images=list(images), return_tensors="pt")
    with torch.no_grad():
        out = model.get_image_features(pixel_values=inputs["pixel_values"].to(model.device, model.dtype))
    return _unit(_pooled(out))


def clip_text_embeddings(model, processor, prompts) -> torch.Tensor:
    """Projected CLIP text embeddings, unit length; prompts longer than the model's context are cut."""
    import torch

    inputs = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = model.get_text_features(input_ids=inputs["input_ids"].to(model.device),
                                      attention_mask=inputs["attention_mask"].to(model.device))
    return _unit(_pooled(out))


def dino_embeddings(model, processor, images) -> torch.Tensor:
    """DINOv2 CLS embeddings (after the final LayerNorm, `pooler_output`), unit length."""
    import torch

    inputs = processor(images=list(images), return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"].to(model.device, model.dtype))
    return _unit(out.pooler_output)


def _pooled(out):
    # transformers 5 returns a ModelOutput from get_*_features (pooler_output is the projected
    # embedding); 4.x returned the tensor itself.
    return out if hasattr(out, "shape") else out.pooler_output


def _unit(x):
    import torch
    return torch.nn.functional.normalize(x.float(), dim=-1)


# --- prompt and subject fidelity --------------------------------------------------------------


def clip_score(model, processor, images, prompts) -> float:
    """Mean CLIP score of image i against prompt i: 100 * max(cos, 0) (CLIPScore, Hessel et al. 2021)."""
    images, prompts = list(images), list(prompts)
    _require_pairs(images, prompts)
    return clip_score_of(clip_image_embeddings(model, processor, images), clip_text_embeddings(model, processor, prompts))


def clip_score_of(image_embeddings, text_embeddings) -> float:
    """`clip_score` on unit embeddings already made: row i of each is a pair."""
    return float((100 * paired_cosines(image_embeddings, text_embeddings).clamp(min=0)).mean())


def paired_cosines(a, b):
    """cos(a_i, b_i) for each row of two [n, d] sets of unit embeddings (prior drift: base image i and
    adapted image i, made from the same prompt and noise)."""
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a * b).sum(-1)


def clip_i(model, processor, images, references) -> float:
    """CLIP-I: mean cosine similarity of every image to every reference (DreamBooth's subject fidelity)."""
    _require_images(images, "images")
    _require_images(references, "reference images")
    return mean_cross_cosine(clip_image_embeddings(model, processor, images),
                              clip_image_embeddings(model, processor, references))


def dino_similarity(model, processor, images, references) -> float:
    """DINO: mean cosine similarity of DINOv2 CLS embeddings of every image to every reference."""
    _require_images(images, "images")
    _require_images(references, "reference images")
    return mean_cross_cosine(dino_embeddings(model, processor, images), dino_embeddings(model, processor, references))


def mean_cross_cosine(a, b) -> float:
    """Mean cosine of every row of `a` with every row of `b` (unit embeddings): CLIP-I and DINO."""
    return float((a @ b.T).mean())


def _require_pairs(images, prompts) -> None:
    _require_images(images, "images")
    if len(images) != len(prompts):
        raise ValueError(f"CLIP score pairs each image with its prompt: got {len(images)} images "
                         f"and {len(prompts)} prompts")


def _require_images(images, what: str) -> None:
    if len(images) == 0:
        raise ValueError(f"no {what} to compare")


# --- distribution distances -------------------------------------------------------------------


def frechet_distance(feats_a, feats_b, min_images: int = MIN_IMAGES_FOR_FD) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ([n, d] each): FID on Inception
    features, FD-DINOv2 on DINOv2 ones. torchmetrics' FrechetInceptionDistance, fed the features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = _features(feats_a), _features(feats_b)
    _require_enough_for_fd(len(a), len(b), min_images)
    metric = FrechetInceptionDistance(feature=_Precomputed(a.shape[1]), reset_real_features=True)
    metric.update(a, real=True)
    metric.update(b, real=False)
    return float(metric.compute())


def kid(feats_a, feats_b, subset_size: int, subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial
    kernel, averaged over `subsets` random subsets of `subset_size`; returns (mean, std). Seeded:
    the subsets are drawn from `seed`, so the same features give the same number."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _features(feats_a), _features(feats_b)
    if subset_size < 2 or subset_size > min(len(a), len(b)):
        raise ValueError(f"KID subset_size must be between 2 and the smaller set's size "
                         f"({min(len(a), len(b))}); got {subset_size}")
    with warnings.catch_warnings():  # "saves all features in a buffer": ours are already in memory
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(a.shape[1]), subsets=subsets, subset_size=subset_size)
    metric.update(a, real=True)
    metric.update(b, real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _require_enough_for_fd(n_a: int, n_b: int, min_images: int) -> None:
    if min(n_a, n_b) < min_images:
        raise ValueError(f"Fréchet distance needs at least {min_images} images per set, got {min(n_a, n_b)}; "
                         f"use KID for small sets")


def _features(feats):
    import torch

    x = torch.as_tensor(feats).detach().double().cpu()
    if x.dim() != 2:
        raise ValueError(f"features must be a [n_images, n_features] array, got shape {tuple(x.shape)}")
    return x


def _precomputed_class():
    import torch

    class Precomputed(torch.nn.Module):
        """A 'feature extractor' that passes features through: torchmetrics' FID/KID take a custom
        extractor module, which is how they accept features computed elsewhere (DINOv2, or Inception
        run once for both sets) without torch-fidelity or torchvision."""

        def __init__(self, num_features: int):
            super().__init__()
            self.num_features = num_features  # read by FrechetInceptionDistance instead of a dummy forward

        def forward(self, x):
            return x

    return Precomputed


def _Precomputed(num_features: int):
    return _precomputed_class()(num_features)


# --- diversity --------------------------------------------------------------------------------


def pairwise_diversity(features) -> float:
    """Mean cosine distance (1 - cos) over all distinct pairs of a set's embeddings; 0 for a
    collapsed set (every image the same)."""
    import torch

    x = _unit(torch.as_tensor(features))
    n = len(x)
    if n < 2:
        raise ValueError(f"diversity needs at least 2 images, got {n}")
    cos = x @ x.T
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    return float((1 - cos[off_diagonal]).mean())
