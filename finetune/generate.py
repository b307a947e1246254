"""`finetune generate`: a base model, optional LoRAs, prompts -> image files."""

from __future__ import annotations

import math
from pathlib import Path

from .cache import file_sha256
from .errors import FinetuneError
from .prompts import SEED_MAX, check_number, excerpt


def _lora_spec(spec: str) -> tuple[Path, float]:
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists():
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass
    if not math.isfinite(weight):  # float() reads "nan" and "inf"; either turns every image to noise
        raise FinetuneError(f"--lora {excerpt(spec)}: the weight must be a finite number, got {excerpt(tail)}")
    p = Path(path)
    if not p.exists():
        raise FinetuneError(f"--lora: {excerpt(path)} does not exist")
    if p.is_file() and p.suffix != ".safetensors":
        raise FinetuneError(f"--lora: {excerpt(path)} is not a .safetensors file; pickled LoRA files are not loaded")
    return p, weight


def check_options(n, seed, steps, guidance, width, height, out: Path) -> None:
    """The command line's numbers and folder, checked before any model loads."""
    for key, value in (("n", n), ("seed", seed), ("steps", steps), ("width", width), ("height", height)):
        if value is not None:
            check_number(key, value, f"--{key}")
    if not math.isfinite(guidance):
        raise FinetuneError(f"--guidance: must be a finite number, got {guidance}")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out: {out} exists and is not a folder")


IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp"}


def image_suffix(image_format: str) -> str:
    suffix = IMAGE_FORMATS.get(str(image_format).lower())
    if suffix is None:
        raise FinetuneError(f"--format: {excerpt(str(image_format))} is not one of png, jpeg, webp")
    return suffix


def first_seeds(rows, n: int, seed: int) -> list[int]:
    """Each row's first seed: its own, else `seed` counted on image by image; every image's seed
    (first + i) must stay within what a generator and the metadata's readers take."""
    firsts, k = [], 0
    for i, row in enumerate(rows):
        count = row.n or n
        first = seed + k if row.seed is None else row.seed
        if first + count - 1 > SEED_MAX:
            where = "--seed" if row.seed is None else f"prompt {i + 1} ({excerpt(row.prompt)}): seed"
            raise FinetuneError(f"{where}: its {count} image(s) would need seeds past {SEED_MAX}")
        firsts.append(first)
        k += count
    return firsts


def load_pipeline(base: str, family: str = "auto", loras: list[str] = (), device: str | None = None,
                  dtype: str | None = None):
    """(pipeline, family, placement): the base model with its LoRAs, on the device and in the dtype
    `devices.choose` picks (`device`/`dtype`: the command line's --device/--dtype, None: choose)."""
    from .devices import choose, place_pipeline
    from .recipe.schema import ModelConfig
    from .train.setup import resolve_family

    specs = [_lora_spec(spec) for spec in loras]  # a missing file or a nan weight fails before the model loads
    choose(device, dtype)  # a device that is not here fails before the model loads too
    model_cfg = ModelConfig(base=base, family=family)
    fam, source = resolve_family(model_cfg)
    placement = choose(device, dtype, family=fam)  # the family's half precision (FLUX: bf16)
    c = fam.load(source, model_cfg, **_load_options(fam, source, placement))
    pipe = place_pipeline(c.pipeline, placement)  # before the LoRAs, which then load where the model is
    names, weights = [], []
    for i, (path, weight) in enumerate(specs):
        name = f"lora{i}"
        _load_lora(pipe, path, name, source.label)
        names.append(name)
        weights.append(weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return pipe, fam, placement


def _load_options(fam, source, placement) -> dict:
    """What `fam.load` takes to read each component straight into its dtype and onto the device (the
    VAE in fp32 unless its config says fp16 is safe); {} for a family whose `load` takes no dtype, which
    `place_pipeline` then casts and moves after loading."""
    import inspect

    from .devices import torch_dtype, vae_dtype
    from .families.base import model_file, read_json

    if "dtype" not in inspect.signature(fam.load).parameters:
        return {}
    vae_config = read_json(model_file(source, "vae/config.json"))  # None: not at hand (a single file)
    return dict(dtype=torch_dtype(placement.dtype), device=placement.torch_device,
                vae_dtype=torch_dtype(vae_dtype(placement.dtype, vae_config)))


def _load_lora(pipe, path: Path, name: str, base: str) -> None:
    """One LoRA into the pipeline, or one line saying why not. diffusers logs a LoRA of another
    model's shapes as a hundred "size mismatch" lines before raising: its logger is muted here, and
    the count and the first mismatch go into our line (and peft's warning about the same mismatch
    is shown only when the LoRA loads anyway)."""
    import logging
    import warnings

    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            folder, weight_name = (path, None) if path.is_dir() else (path.parent, path.name)
            if component := _lokr_component(pipe, folder / (weight_name or "pytorch_lora_weights.safetensors")):
                # diffusers' pipelines read LoRA keys only; its models read a peft LoKr file too.
                getattr(pipe, component).load_lora_adapter(str(folder), weight_name=weight_name or
                                                           "pytorch_lora_weights.safetensors", prefix=component,
                                                           adapter_name=name)
            else:
                pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    except (ValueError, OSError, KeyError, AssertionError) as e:  # diffusers' converters assert on odd shapes
        raise FinetuneError(f"--lora: {path} could not be loaded into {base}: {excerpt(str(e).splitlines()[0], 200)}") from e
    except RuntimeError as e:  # torch's load_state_dict, one line per tensor of another shape
        mismatches = [line.strip().removeprefix("size mismatch for ") for line in str(e).splitlines()
                      if "size mismatch for" in line]
        if not mismatches:
            raise
        raise FinetuneError(f"--lora: {path} does not fit {base}: {len(mismatches)} tensors have other shapes "
                            f"(first: {excerpt(mismatches[0], 160)}); it was trained for another model family "
                            "or size") from e
    finally:
        logger.setLevel(level)


def _lokr_component(pipe, file: Path) -> str | None:
    """The denoiser's name when `file` is a peft LoKr file in diffusers' layout (`unet.<module>.lokr_w1`)."""
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
    except Exception:  # not safetensors: load_lora_weights says what it is
        return None
    for component in ("unet", "transformer"):
        if hasattr(pipe, component) and any(k.startswith(component + ".") and ".lokr_" in k for k in keys):
            return component
    return None


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
             log=print, prompt_file=None, make_grid: bool = False, device: str | None = None,
             dtype: str | None = None, image_format: str = "png") -> list[Path]:
    """Images into `out`, as `image_format` files (png, jpeg, webp). `device`/`dtype` ("cuda", "cuda:1",
    "mps", "cpu"; "fp16", "bf16", "fp32"; None or "auto": the best device present, in the precision it
    runs well, as `devices.choose` says)."""
    from dataclasses import replace

    from PIL import Image

    from .hooks import OutputImage, Provenance, build_pipeline
    from .hooks.pipeline import next_index, write_outputs
    from .prompts import PromptRow, read_prompt_file
    from .train.sampling import Destination, Sampling, emit_images, grid

    from .devices import choose, describe

    out = Path(out)
    check_options(n, seed, steps, guidance, width, height, out)
    suffix = image_suffix(image_format)
    choose(device, dtype)  # --device cuda on a machine without CUDA: one line, before anything loads
    rows = [PromptRow(p) for p in prompts] + (read_prompt_file(prompt_file) if prompt_file else [])
    if not rows:
        raise FinetuneError("give at least one --prompt or a --prompts file")
    seeds = first_seeds(rows, n, seed)
    output_hooks = build_pipeline(hooks, log)  # before the model loads: a bad hook fails fast
    pipe, _, placement = load_pipeline(base, family, loras, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    for hook in output_hooks.hooks:  # image classifiers (the safety checker) run where the images are made
        if callable(getattr(hook, "place", None)):
            hook.place(placement.torch_device)
    if placement.device != "cpu":  # the CPU in fp32 is what generate always did: nothing new to say
        log(describe(placement, pipe))
    for line in output_hooks.describe():  # once the model loaded: a bad --lora stays a one-line answer
        log(line)
    provenance = Provenance(prompt="", base_model=base, adapters=adapter_records(loras), kind="generate")
    written, k = [], next_index(out)  # images already in `out` keep their names; new ones count on
    for row, first in zip(rows, seeds):
        how = Sampling(seed=first, n=row.n or n, steps=steps, guidance=guidance,
                       negative_prompt=row.negative_prompt or negative, width=row.width or width,
                       height=row.height or height)
        written += emit_images(pipe, [row.prompt], how, Destination(out, output_hooks, provenance, k, log, suffix))
        k += row.n or n
    if make_grid and written:
        # The grid is an image we emit too: it goes through the same hooks.
        sheet = grid([Image.open(p) for p in written])
        item = output_hooks.process(OutputImage(sheet, replace(provenance, prompt=f"grid of {len(written)} images",
                                                               kind="grid", width=sheet.width, height=sheet.height)))
        written += write_outputs([(out / f"grid{suffix}", item)], out, log=log)
    return written
