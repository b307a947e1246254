"""README.md model card for a run folder: what was trained on what, how to use it, samples."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..files import write_text_atomically
from .plots import card_lines

METHOD_NAMES = {"lora": "LoRA", "dreambooth": "DreamBooth (full fine-tune)", "textual_inversion": "textual-inversion"}


def _trigger_words(recipe) -> list[str]:
    words = list(recipe.output.trigger_words)
    if recipe.data.instance_prompt and not words:
        words.append(recipe.data.instance_prompt)
    return words


def _generate_line(recipe, family, prompt: str) -> str:
    """The pipeline call with the settings the run's samples were made with."""
    v = recipe.validation
    args = [repr(prompt), f"num_inference_steps={v.num_inference_steps}", f"{family.guidance_keyword}={v.guidance_scale}",
            f"width={v.width or recipe.data.resolution}", f"height={v.height or recipe.data.resolution}"]
    if v.negative_prompt:
        args.insert(1, f"negative_prompt={v.negative_prompt!r}")
    return f"image = pipe({', '.join(args)}).images[0]"


def _webui_line(family, kohya: str) -> str:
    """Where the kohya-layout LoRA goes in the apps that load this family (AUTOMATIC1111 runs no FLUX)."""
    prompt_apps = [app for app in ("AUTOMATIC1111", "Forge") if app in family.kohya_apps]
    parts = [f"In {'/'.join(prompt_apps)}: copy `{kohya}` into `models/Lora` and add `<lora:{Path(kohya).stem}:1>` "
             "to the prompt."] if prompt_apps else []
    if "ComfyUI" in family.kohya_apps:
        parts.append(f"In ComfyUI: copy `{kohya}` into `models/loras` and pick it in a LoraLoader node.")
    return " ".join(parts)


def memory_line(run_dir: Path) -> dict | None:
    """The `memory` line the run wrote to its metrics.jsonl (finetune/train/peak.py), the last one."""
    from ..train.run_dir import read_metrics

    found = [row["memory"] for row in read_metrics(Path(run_dir) / "metrics.jsonl") if isinstance(row.get("memory"), dict)]
    return found[-1] if found else None


def _memory_row(run_dir: Path) -> list[str]:
    """The table row of the measured peaks, each beside the plan's prediction."""
    m = memory_line(run_dir)
    if m is None:
        return []

    def gib(key: str) -> str:
        return f"{m[key] / 2**30:.2f} GiB" if isinstance(m.get(key), int) else "-"

    if m.get("peak_gpu_bytes") is not None:
        gpu = f"GPU {gib('peak_gpu_bytes')} peak (plan said {gib('predicted_gpu_bytes')})"
    else:
        gpu = f"GPU not measured on {m.get('device')} (plan said {gib('predicted_gpu_bytes')} for a GPU)"
    return [f"| memory | {gpu}; host RAM {gib('peak_ram_bytes')} peak (plan said {gib('predicted_ram_bytes')}) |"]


def _memory_options(recipe) -> list[str]:
    """The `memory:` settings that differ from the defaults (float8 or quantized base, parked blocks...):
    they change what the adapter was trained against."""
    mem = getattr(recipe, "memory", None)
    if mem is None:
        return []
    defaults = type(mem)()
    changed = [f"{k}={v}" for k, v in mem.model_dump().items() if v != getattr(defaults, k)]
    return [f"| memory options | {', '.join(changed)} |"] if changed else []


def _ema_line(run_dir: Path, recipe) -> list[str]:
    """training.ema wrote every file above again, with the averaged weights, into ema/."""
    ema = getattr(recipe.training, "ema", None)
    if ema is None or not (Path(run_dir) / "ema").is_dir():
        return []
    return [f"- `ema/` — the same files with the exponential moving average of the weights (training.ema, decay "
            f"{ema.decay}); load them as below from `{(Path(run_dir) / 'ema').resolve()}`"]


def write_model_card(run_dir: Path, recipe, family, method, source, run_name: str, files: list[Path],
                     samples: list[Path], losses: list[float]) -> Path:
    from ..train.decisions import card_rows

    t, m, d = recipe.training, recipe.method, recipe.data
    method_name = METHOD_NAMES.get(m.type, m.type)
    cls = family.pipeline_class.__name__
    # A snippet that runs as written: builtin models are folders on disk, single files load differently.
    # Absolute paths: the code must run from wherever the user pastes it, not only from the folder
    # the run started in (and offline, diffusers takes a relative path it cannot find for a hub id).
    if source.kind == "single_file":
        load = f"pipe = {cls}.from_single_file({str(Path(source.location).resolve())!r})"
    elif source.kind == "folder":
        load = f"pipe = {cls}.from_pretrained({str(Path(source.location).resolve())!r})"
    else:
        load = f"pipe = {cls}.from_pretrained({source.label!r})"
    triggers = _trigger_words(recipe)
    kohya = next((f.name for f in files if "kohya" in method.describe_file(f)), None)
    lines = [
        "---",
        f"base_model: {source.label}",
        "library_name: diffusers",
        f"tags: [text-to-image, {m.type}, finetune]",
        "---",
        "",
        f"# {run_name}",
        "",
        f"A {method_name} adapter for **{source.label}** ({family.name}), trained with finetune {__version__}.",
        "",
        "## Trigger words",
        "",
        *([f"- `{w}`" for w in triggers] or ["None: the adapter applies without a special word."]),
        "",
        *(["## Validation prompts", "", *[f"- {p}" for p in recipe.validation.prompts], ""]
          if recipe.validation.prompts else []),
        "## Files",
        "",
        *[f"- `{f.name}`" + (f" — {method.describe_file(f)}" if method.describe_file(f) else "") for f in files],
        *_ema_line(run_dir, recipe),
        "",
        "## Use it",
        "",
        "```python",
        *method.usage(cls, load, Path(run_dir).resolve(), [Path(f).resolve() for f in files]),
        _generate_line(recipe, family, (recipe.validation.prompts or triggers or ["a photo"])[0]),
        'image.save("sample.png")',
        "```",
        "",
        *([_webui_line(family, kohya)] if kohya else []),
        "",
        "## Recipe summary",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| method | {m.type}, rank {getattr(m, 'rank', '-')}, alpha {getattr(m, 'alpha', None) or getattr(m, 'rank', '-')}"
        f"{', text encoder too' if getattr(m, 'train_text_encoder', False) else ''} |",
        f"| data | {d.path}, resolution {d.resolution}, repeats {d.repeats}, bucketing {'on' if d.bucketing.enabled else 'off'} |",
        f"| steps | {len(losses)} (batch {t.batch_size} x accumulation {t.gradient_accumulation_steps}) |",
        f"| optimizer | {recipe.optimizer.type}, learning rate {t.learning_rate}, scheduler {t.lr_scheduler} |",
        f"| precision | {t.mixed_precision}; gradient checkpointing {'on' if t.gradient_checkpointing else 'off'} |",
        f"| seed | {t.seed} |",
        f"| final loss | {losses[-1]:.4f} |" if losses else "| final loss | - |",
        *card_rows(run_dir),  # validation metrics (val_loss, validation.metrics) and output.keep_best's checkpoint
        *_memory_options(recipe),
        *_memory_row(run_dir),
        "",
        "The full resolved recipe is `recipe.yaml` in this folder; `finetune train recipe.yaml output.run_name=NEW` "
        "reproduces the run into a new folder.",
        "",
    ]
    lines += card_lines(run_dir)  # plots/metrics.png and plots/samples.png, those the run has
    if samples:
        lines += ["## Samples", ""]
        for p in samples:
            lines.append(f"![{p.stem}]({p.relative_to(run_dir).as_posix()})")
        lines.append("")
    return write_text_atomically(run_dir / "README.md", "\n".join(lines))


def set_card_section(run_dir: Path, key: str, lines: list[str]) -> Path | None:
    """Put `lines` into the run's model card between `<!-- finetune:KEY -->` markers, replacing what
    an earlier call put there, else at the end; no card, nothing to do (None)."""
    card = Path(run_dir) / "README.md"
    if not card.is_file():
        return None
    start, end = f"<!-- finetune:{key} -->", f"<!-- /finetune:{key} -->"
    text = card.read_text(encoding="utf-8")
    block = "\n".join([start, *lines, end])
    if start in text and end in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    return write_text_atomically(card, text)
