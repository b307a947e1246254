"""`finetune generate`: a base model, optional LoRAs, prompts -> image files."""

from __future__ import annotations

from pathlib import Path

from .cache import file_sha256
from .errors import FinetuneError


def _lora_spec(spec: str) -> tuple[Path, float]:
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass
    p = Path(path)
    if not p.exists():
        raise FinetuneError(f"--lora: {path} does not exist")
    if p.is_file() and p.suffix != ".safetensors":
        raise FinetuneError(f"--lora: {path} is not a .safetensors file; pickled LoRA files are not loaded")
    return p, weight


def load_pipeline(base: str, family: str = "auto", loras: list[str] = ()):
    from .recipe.schema import ModelConfig
    from .train.loop import resolve_family

    model_cfg = ModelConfig(base=base, family=family)
    fam, source = resolve_family(model_cfg)
    c = fam.load(source, model_cfg)
    pipe = c.pipeline
    names, weights = [], []
    for i, spec in enumerate(loras):
        path, weight = _lora_spec(spec)
        name = f"lora{i}"
        try:
            if path.is_dir():
                pipe.load_lora_weights(str(path), adapter_name=name)
            else:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except (ValueError, OSError, KeyError, AssertionError) as e:  # diffusers' converters assert on odd shapes
            raise FinetuneError(f"--lora: {path} could not be loaded into {source.label}: {str(e).splitlines()[0]}") from e
        names.append(name)
        weights.append(weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return pipe, fam


def adapter_records(loras) -> list[dict]:
    """{"path", "sha256", "weight"} for each adapter file (a run folder's LoRA files, each)."""
    records = []
    for spec in loras:
        path, weight = _lora_spec(spec)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        records += [{"path": str(f), "sha256": file_sha256(f), "weight": weight} for f in files]
    return records


def generate(prompts, base, loras=(), n=1, seed=0, steps=25, guidance=7.5, negative=None, width=None,
             height=None, out=Path("outputs/generated"), family="auto", hooks: list[dict] | None = None,
             log=print, prompt_file=None, make_grid: bool = False) -> list[Path]:
    from dataclasses import replace

    from PIL import Image

    from .hooks import OutputImage, Provenance, build_pipeline
    from .hooks.pipeline import write_outputs
    from .prompts import PromptRow, read_prompt_file
    from .train.sampling import emit_images, grid

    for name, v in (("--width", width), ("--height", height)):
        if v is not None and v % 8:
            raise FinetuneError(f"{name}: {v} is not a multiple of 8")
    rows = [PromptRow(p) for p in prompts] + (read_prompt_file(prompt_file) if prompt_file else [])
    if not rows:
        raise FinetuneError("give at least one --prompt or a --prompts file")
    output_hooks = build_pipeline(hooks, log)  # before the model loads: a bad hook fails fast
    pipe, _ = load_pipeline(base, family, loras)
    pipe.set_progress_bar_config(disable=True)
    provenance = Provenance(prompt="", base_model=base, adapters=adapter_records(loras), kind="generate")
    out = Path(out)
    written, k = [], 0
    for row in rows:
        count = row.n or n
        written += emit_images(pipe, [row.prompt], output_hooks, out, seed=seed + k if row.seed is None else row.seed,
                               n=count, steps=steps, guidance=guidance, negative_prompt=row.negative_prompt or negative,
                               width=row.width or width, height=row.height or height, provenance=provenance,
                               first_index=k)
        k += count
    if make_grid and written:
        # The grid is an image we emit too: it goes through the same hooks.
        sheet = grid([Image.open(p) for p in written])
        item = output_hooks.process(OutputImage(sheet, replace(provenance, prompt=f"grid of {len(written)} images",
                                                               kind="grid", width=sheet.width, height=sheet.height)))
        written += write_outputs([(out / "grid.png", item)], out)
    return written
