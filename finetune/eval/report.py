"""What `finetune eval` writes: eval.json (every number, every missing metric and why, every setting),
report.md (a table that says which way is better, and a base-vs-adapter grid per prompt), grids/."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from .. import __version__
from .images import ADAPTED, BASE

# name, what it measures, which way is better
METRICS = [
    ("clip_score", "prompt fidelity: CLIP score of each image against its prompt (0-100)", "higher"),
    ("clip_i", "subject fidelity: CLIP image similarity to the reference images (-1 to 1)", "higher"),
    ("dino", "subject fidelity: DINOv2 similarity to the reference images (-1 to 1)", "higher"),
    ("diversity", "variety: mean pairwise DINOv2 distance among the images (0: all the same)", "higher"),
    ("fd_dinov2", "distance of the image set to the reference set (Fréchet, DINOv2 features)", "lower"),
    ("kid_dinov2", "distance of the image set to the reference set (KID, DINOv2 features; small sets)", "lower"),
    ("fid", "FID: distance of the image set to the reference set (Inception features)", "lower"),
    ("kid_inception", "KID on Inception features", "lower"),
    ("prior_clip_i", "prior kept: CLIP similarity of each prior-prompt image without vs with the adapter", "higher"),
    ("prior_dino", "prior kept: DINOv2 similarity of each prior-prompt image without vs with the adapter", "higher"),
]
GRIDS = "grids"
REPORT = "report.md"
RESULTS = "eval.json"


def write_report(folder: Path, inputs, settings, models, pairs, results, final: Path) -> None:
    """eval.json, the grids and report.md into `folder` (which becomes `final`: paths are relative)."""
    grids = _write_grids(folder, pairs)
    record = _record(inputs, settings, models, pairs, results, folder)
    (folder / RESULTS).write_text(json.dumps(record, indent=1), encoding="utf-8")
    (folder / REPORT).write_text("\n".join(_report_lines(record, grids, folder)) + "\n", encoding="utf-8")


def _record(inputs, settings, models, pairs, results, folder: Path) -> dict:
    from ..generate import adapter_records

    a = inputs.adapter
    files = [a.path] if a.path.is_file() else sorted(a.path.glob("*.safetensors"))
    return {
        "finetune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": inputs.target,
        "run": str(inputs.run_dir) if inputs.run_dir else None,
        "method": a.kind,
        "adapter": adapter_records([str(f) for f in files]) if a.kind != "dreambooth" else [{"path": str(a.path)}],
        "base": inputs.base,
        "settings": vars(settings),
        "metric_models": models.names,
        "trigger_words": inputs.triggers,
        "prompts": {"subject": [r.prompt for r in inputs.subject], "prior": [r.prompt for r in inputs.prior]},
        "reference": {"path": inputs.reference_where, "count": len(inputs.reference)},
        "metrics": results.metrics,
        "missing": results.missing,
        "images": [{"prompt": p.prompt, "kind": "subject" if p.subject else "prior", "seed": p.seed,
                    BASE: p.base.relative_to(folder).as_posix(), ADAPTED: p.adapted.relative_to(folder).as_posix()}
                   for p in pairs],
    }


def _write_grids(folder: Path, pairs) -> list[tuple[str, str]]:
    """A grid per prompt: its base images on top, the adapter's below, seed by seed; (prompt, path)."""
    from PIL import Image

    from ..train.sampling import grid, slug

    by_prompt = defaultdict(list)
    for p in pairs:
        by_prompt[(p.subject, p.prompt)].append(p)
    (folder / GRIDS).mkdir()
    made = []
    for k, ((_, prompt), group) in enumerate(by_prompt.items()):
        images = [Image.open(p.base) for p in group] + [Image.open(p.adapted) for p in group]
        path = folder / GRIDS / f"{k:02d}-{slug(prompt)}.png"
        grid(images, columns=len(group)).save(path)
        made.append((prompt, path.relative_to(folder).as_posix()))
    return made


def _report_lines(record: dict, grids, folder: Path) -> list[str]:
    s = record["settings"]
    lines = [
        f"# Evaluation of {record['target']}",
        "",
        f"Base model `{record['base']}`, {record['method']} adapter. {s['n']} image(s) per prompt from seed "
        f"{s['seed']}, {s['steps']} steps, guidance {s['guidance']}; the same seeds (the same starting noise) "
        "without and with the adapter.",
        f"Reference images: {record['reference']['count']} from `{record['reference']['path']}`." if
        record["reference"]["count"] else "No reference images.",
        "",
        "| metric | base | with adapter | better | what it measures |",
        "| --- | --- | --- | --- | --- |",
        *_metric_rows(record["metrics"]),
        "",
        *_missing_lines(record["missing"]),
        "## Prompts",
        "",
        *[f"- subject: {p}" for p in record["prompts"]["subject"]],
        *[f"- prior (without the trigger): {p}" for p in record["prompts"]["prior"]],
        "",
        "## Images",
        "",
        "Each grid: the base model's images on the top row, the same seeds with the adapter below.",
        "",
    ]
    for prompt, path in grids:
        lines += [f"**{prompt}**", "", f"![{prompt}]({path})", ""]
    return lines


def _metric_rows(metrics: dict) -> list[str]:
    rows = []
    for name, what, better in METRICS:
        if name not in metrics:
            continue
        rows.append(f"| {name} | {_value(metrics, name, BASE)} | {_value(metrics, name, ADAPTED)} | {better} | {what} |")
    return rows


def _value(metrics: dict, name: str, side: str) -> str:
    value = metrics[name].get(side)
    if value is None:
        return "-"
    std = metrics.get(f"{name}_std", {}).get(side)
    return f"{value:.4f} ± {std:.4f}" if std is not None else f"{value:.4f}"


def _missing_lines(missing: dict) -> list[str]:
    if not missing:
        return []
    return ["Not measured:", "", *[f"- {name}: {why}" for name, why in missing.items()], ""]


def headline(record: dict) -> str:
    """One line of the numbers a reader looks at first (the model card's)."""
    parts = []
    for name in ("clip_score", "clip_i", "dino", "prior_dino"):
        m = record["metrics"].get(name)
        if m and m.get(ADAPTED) is not None:
            before = f" (base {m[BASE]:.3f})" if m.get(BASE) is not None else ""
            parts.append(f"{name} {m[ADAPTED]:.3f}{before}")
    return ", ".join(parts) or "no metric could be measured (see the report)"


def link_from_card(run_dir: Path, folder: Path) -> None:
    """The model card's Evaluation section: the headline numbers and links to the report and grids."""
    from ..export.model_card import set_card_section

    record = json.loads((folder / RESULTS).read_text(encoding="utf-8"))
    rel = folder.resolve().relative_to(run_dir.resolve()).as_posix()
    lines = ["## Evaluation", "", f"`finetune eval` ({record['created']}): {headline(record)}.", "",
             f"The full report, with a base-vs-adapter grid per prompt: [{rel}/{REPORT}]({rel}/{REPORT}); "
             f"every number in [{rel}/{RESULTS}]({rel}/{RESULTS}).", ""]
    set_card_section(run_dir, "eval", lines)
