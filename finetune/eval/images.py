"""The images `finetune eval` measures: every prompt sampled by the base model, then by the base with
the adapter, with the same seeds (so the same starting noise) — the two differ only by the adapter.
Both pass the output hooks, as every image finetune writes does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError
from .inputs import Adapter

BASE, ADAPTED = "base", "adapter"


@dataclass
class Settings:
    n: int
    seed: int
    steps: int
    guidance: float
    width: int | None
    height: int | None


@dataclass
class Pair:
    """One prompt's image of one seed, made without and with the adapter."""
    prompt: str
    subject: bool  # a prompt with the trigger (else: a prior prompt)
    seed: int
    base: Path
    adapted: Path


def sample_both(inputs, settings: Settings, folder: Path, device, dtype, log) -> tuple[list[Pair], object]:
    """Sample every prompt without and with the adapter into `folder/images/{base,adapter}`; the pairs
    both of whose images were written (the hooks may refuse some), and the placement used. A LoRA or
    embeddings load into the base pipeline; a DreamBooth model replaces it."""
    from ..generate import first_seeds, load_pipeline
    from ..hooks import build_pipeline

    rows = [*inputs.subject, *inputs.prior]
    seeds = first_seeds(rows, settings.n, settings.seed)
    hooks = build_pipeline(None, log)
    pipe, _, placement = load_pipeline(inputs.base, inputs.family, [], device, dtype)
    written = {BASE: _sample(pipe, rows, seeds, settings, folder / "images" / BASE, hooks, inputs, log)}
    if inputs.adapter.kind == "dreambooth":  # the fine-tuned model replaces the base: never both in memory
        del pipe
        _free(placement)
        pipe, _, placement = load_pipeline(str(inputs.adapter.path), inputs.family, [], device, dtype)
    else:
        apply_adapter(pipe, inputs)
    written[ADAPTED] = _sample(pipe, rows, seeds, settings, folder / "images" / ADAPTED, hooks, inputs, log)
    del pipe
    _free(placement)
    pairs = []
    for (row, seed, name), path in written[BASE].items():
        twin = written[ADAPTED].get((row, seed, name))
        if twin is not None:
            pairs.append(Pair(rows[row].prompt, row < len(inputs.subject), seed, path, twin))
    if not pairs:
        raise FinetuneError("no image was written both without and with the adapter (see the refusals above)")
    return pairs, placement


def _sample(pipe, rows, seeds, settings: Settings, folder: Path, hooks, inputs, log) -> dict:
    """(row, seed, file name) -> path of each image written."""
    from ..hooks import Provenance
    from ..train.sampling import Destination, Sampling, emit_images

    from ..generate import adapter_records

    pipe.set_progress_bar_config(disable=True)
    side = folder.name
    adapters = adapter_records([str(inputs.adapter.path)]) if side == ADAPTED and inputs.adapter.kind != "dreambooth" else []
    provenance = Provenance(prompt="", base_model=inputs.base, adapters=adapters, kind=f"eval {side}")
    out, k = {}, 0
    for i, (row, first) in enumerate(zip(rows, seeds)):
        n = row.n or settings.n
        log(f"eval: {'without' if side == BASE else 'with'} the adapter, prompt {i + 1}/{len(rows)}: {row.prompt} "
            f"({n} image{'s' * (n > 1)})")
        how = Sampling(seed=first, n=n, steps=settings.steps, guidance=settings.guidance,
                       negative_prompt=row.negative_prompt, width=row.width or settings.width,
                       height=row.height or settings.height)
        for path in emit_images(pipe, [row.prompt], how, Destination(folder, hooks, provenance, k, log)):
            if path.suffix == ".png":
                index = int(path.name.rsplit("-", 1)[-1].removesuffix(".png"))
                out[(i, first + index, path.name)] = path
        k += n
    return out


def apply_adapter(pipe, inputs) -> None:
    """Load a LoRA or textual-inversion embeddings into the base pipeline, where it is."""
    from ..generate import _load_lora

    a: Adapter = inputs.adapter
    if a.kind == "lora":
        _load_lora(pipe, a.path if a.path.is_file() else a.path / "pytorch_lora_weights.safetensors", "adapter",
                   inputs.base)
        pipe.set_adapters(["adapter"], adapter_weights=[1.0])
        return
    from ..methods.textual_inversion import DIFFUSERS_EMBEDS_NAME, diffusers_embeds_name

    if (a.path / diffusers_embeds_name(1)).exists():
        raise FinetuneError(f"{a.path}: finetune eval does not yet load embeddings for two text encoders")
    pipe.load_textual_inversion(str(a.path / DIFFUSERS_EMBEDS_NAME), token=a.token)


def _free(placement) -> None:
    import gc

    import torch

    gc.collect()
    if placement.device.startswith("cuda"):
        torch.cuda.empty_cache()
