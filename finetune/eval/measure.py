"""Measurements on sets of images, shared by `finetune eval` and `validation.metrics`.

Images are embedded once per model (`embed`), and every metric is computed from the embeddings.
Each group returns `Scores`: the values it could compute and, for every metric it could not, the
reason (a model that is not there, too few images); a metric is never reported as 0 for being missing.

- `subject_scores`: clip_score (image vs its prompt), clip_i and dino (similarity to the reference
  images), diversity (mean pairwise DINO distance among the images);
- `distribution_scores`: fd_dinov2 and kid_dinov2 (and fid, kid_inception when Inception is loaded)
  of the images against the reference set;
- `prior_scores`: prior_clip_i and prior_dino, the mean similarity of image i without the adapter to
  image i with it (same prompt, same noise): 1 is a prior left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import metrics as M

EMBED_BATCH = 16  # images through a metric model at once: bounded memory for any set size
INCEPTION_SIZE = 299
# KID's subsets: the smaller set whole, up to torchmetrics' default subset size.
KID_MAX_SUBSET = 1000


@dataclass
class Embedded:
    """A set of images as each loaded metric model sees it: [n, d] unit embeddings (Inception: raw
    pool features, as FID takes them); None where that model is not loaded."""

    count: int
    clip: Any = None
    dino: Any = None
    inception: Any = None


@dataclass
class Scores:
    values: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def add(self, other: Scores, prefix: str = "") -> Scores:
        self.values.update({prefix + k: v for k, v in other.values.items()})
        self.missing.update({prefix + k: v for k, v in other.missing.items()})
        return self


def embed(models, images) -> Embedded:
    """Every loaded model's embeddings of `images` (an iterable of PIL images, read EMBED_BATCH at a
    time: a thousand reference photos are never all in memory at once)."""
    from itertools import islice

    import torch

    parts = {"clip": [], "dino": [], "inception": []}
    count, it = 0, iter(images)
    while chunk := list(islice(it, EMBED_BATCH)):
        count += len(chunk)
        if models.clip is not None:
            parts["clip"].append(M.clip_image_embeddings(models.clip.model, models.clip.processor, chunk))
        if models.dino is not None:
            parts["dino"].append(M.dino_embeddings(models.dino.model, models.dino.processor, chunk))
        if models.inception is not None:
            parts["inception"].append(_inception_features(models.inception, chunk))
    return Embedded(count, **{kind: torch.cat(p) if p else None for kind, p in parts.items()})


def embed_each_on(models, images, device) -> Embedded:
    """`embed` with one metric model at a time on `device`, back on the CPU after it: during training
    the accelerator holds the model being trained, and CLIP-L and DINOv2-L need not join it together.
    `images`: a callable giving a fresh iterable of the images (each model reads them once).
    The embeddings come back on the CPU."""
    from dataclasses import replace

    out = Embedded(0)
    for kind in ("clip", "dino", "inception"):
        if getattr(models, kind) is None:
            continue
        one = replace(models, **{k: None for k in ("clip", "dino", "inception") if k != kind}).to(device)
        try:
            part = embed(one, images())
        finally:
            one.to("cpu")
        out.count = part.count
        setattr(out, kind, getattr(part, kind).cpu() if part.count else None)
    return out


def _inception_features(inception, images):
    """Pool features of the FID Inception, which takes uint8 [n, 3, H, W] and resizes to 299 itself;
    images are resized here first so one batch has one size."""
    import numpy as np
    import torch

    arrays = [np.asarray(im.convert("RGB").resize((INCEPTION_SIZE, INCEPTION_SIZE))) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    device = next(inception.parameters()).device
    with torch.no_grad():
        return inception(x.to(device)).reshape(len(images), -1).double().cpu()


# ------------------------------------------------------------------ subject and prompt fidelity


def subject_scores(models, images: Embedded, prompts: list[str], reference: Embedded | None,
                   wanted=("clip_score", "clip_i", "dino", "diversity")) -> Scores:
    """The `wanted` subject metrics of `images` (image i made from prompts[i]) against `reference`."""
    s = Scores()
    for name in wanted:
        reason = _subject_problem(name, models, images, reference)
        if reason:
            s.missing[name] = reason
        else:
            s.values[name] = _SUBJECT[name](models, images, prompts, reference)
    return s


def _subject_problem(name: str, models, images: Embedded, reference: Embedded | None) -> str:
    kind = "clip" if name in ("clip_score", "clip_i") else "dino"
    if getattr(models, kind) is None:
        return models.missing.get(kind, f"no {kind} metric model")
    if images.count == 0:
        return "no images to measure"
    if name in ("clip_i", "dino") and (reference is None or reference.count == 0):
        return "no reference images to compare with"
    if name == "diversity" and images.count < 2:
        return f"diversity needs at least 2 images, there is {images.count}"
    return ""


def _clip_score(models, images, prompts, reference):
    text = M.clip_text_embeddings(models.clip.model, models.clip.processor, prompts)
    return M.clip_score_of(images.clip, text)


_SUBJECT = {
    "clip_score": _clip_score,
    "clip_i": lambda models, images, prompts, reference: M.mean_cross_cosine(images.clip, reference.clip),
    "dino": lambda models, images, prompts, reference: M.mean_cross_cosine(images.dino, reference.dino),
    "diversity": lambda models, images, prompts, reference: M.pairwise_diversity(images.dino),
}


# ------------------------------------------------------------------ distribution distances


def distribution_scores(models, images: Embedded, reference: Embedded, min_fd: int = M.MIN_IMAGES_FOR_FD,
                        seed: int = 0) -> Scores:
    """fd_dinov2 / kid_dinov2 (DINOv2 features) and fid / kid_inception (Inception), images vs reference."""
    s = Scores()
    for fd, kid, kind in (("fd_dinov2", "kid_dinov2", "dino"), ("fid", "kid_inception", "inception")):
        a, b = getattr(images, kind), getattr(reference, kind)
        if a is None or b is None:
            reason = "no reference images to compare with" if getattr(models, kind) is not None \
                else models.missing.get(kind, f"no {kind} metric model")
            s.missing.update({fd: reason, kid: reason})
            continue
        n = min(len(a), len(b))
        if n >= min_fd:
            s.values[fd] = M.frechet_distance(a, b, min_images=min_fd)
        else:
            s.missing[fd] = (f"needs at least {min_fd} images in each set, there are {len(a)} generated and "
                             f"{len(b)} reference; {kid} is reported instead (raise --n for more)")
        if n >= 2:
            s.values[kid], s.values[kid + "_std"] = M.kid(a, b, subset_size=min(n, KID_MAX_SUBSET), seed=seed)
        else:
            s.missing[kid] = f"needs at least 2 images in each set, there are {len(a)} generated and {len(b)} reference"
    return s


# ------------------------------------------------------------------ prior drift


def prior_scores(models, base: Embedded, adapted: Embedded) -> Scores:
    """Mean similarity of each base image to the adapted image of the same prompt and seed."""
    s = Scores()
    for name, kind in (("prior_clip_i", "clip"), ("prior_dino", "dino")):
        a, b = getattr(base, kind), getattr(adapted, kind)
        if getattr(models, kind) is None:
            s.missing[name] = models.missing.get(kind, f"no {kind} metric model")
        elif a is None or b is None or base.count == 0:
            s.missing[name] = "no prompt without the trigger words to measure the prior on"
        else:
            s.values[name] = float(M.paired_cosines(a, b).mean())
    return s
