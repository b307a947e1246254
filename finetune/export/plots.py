"""Pictures of a run, for people who would rather look than read: `plots/metrics.png` (loss raw and
smoothed, learning rate and every other per-step number in metrics.jsonl, over steps) and
`plots/samples.png` (the validation samples, one row per prompt and seed, one column per validation
step). Made at the end of a run, best effort: a plot that cannot be made is one warning line, and
the run's result stands without it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from ..files import write_atomically

PLOTS = "plots"
METRICS_PNG = "metrics.png"
SAMPLES_PNG = "samples.png"
# Keys of a step row that are coordinates (in steps or seconds), not measurements.
NOT_PLOTTED = {"step", "epoch", "elapsed_s"}
# TensorBoard's default smoothing: each point weighs 10% into the running (bias-corrected) average.
EMA_WEIGHT = 0.9
# The sample grid: cells at most this many pixels a side, a header row of step labels, a column of prompts.
MAX_CELL = 256
HEADER = 24
LABEL = 200


def write_plots(run_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Both plots into `run_dir/plots/`; those that could be made. Never raises for a plot."""
    made = []
    for name, make in ((METRICS_PNG, metrics_plot), (SAMPLES_PNG, samples_grid)):
        try:
            if make(run_dir, run_dir / PLOTS / name):
                made.append(run_dir / PLOTS / name)
        except Exception as e:  # noqa: BLE001 - a picture is never worth a failed run
            log(f"warning: {PLOTS}/{name} not made: {type(e).__name__}: {e}")
    return made


def card_lines(run_dir: Path) -> list[str]:
    """The model card's section linking the plots this run has."""
    titles = (("Metrics", METRICS_PNG), ("Samples over steps", SAMPLES_PNG))
    found = [(title, f"{PLOTS}/{name}") for title, name in titles if (Path(run_dir) / PLOTS / name).is_file()]
    if not found:
        return []
    return ["## Plots", "", *[f"![{title}]({path})" for title, path in found], ""]


# ------------------------------------------------------------------ metrics.png


def step_series(metrics: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Each numeric per-step metric of a metrics.jsonl: name -> (steps, values). Rows without an
    integer `step` (the `memory` record) and lines that are not JSON (a torn last line) are passed over."""
    from ..train.run_dir import read_metrics

    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in read_metrics(metrics):
        if not _number(row.get("step")):
            continue
        for key, value in row.items():
            if key not in NOT_PLOTTED and _number(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(row["step"]))
                values.append(float(value))
    return series


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Bias-corrected exponential moving average, as TensorBoard smooths (the first points are not
    pulled towards 0); non-finite values are skipped."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            n += 1
            avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** n) if n else math.nan)
    return out


def metrics_plot(run_dir: Path, out: Path) -> bool:
    """metrics.png: one panel for the loss (raw and smoothed), one for the learning rate, one for each
    other metric. Drawn on a bare Agg canvas: pyplot's global backend (a notebook's) stays as it is."""
    path = run_dir / "metrics.jsonl"
    series = step_series(path) if path.is_file() else {}
    if not series:
        raise ValueError(f"no per-step metrics in {path}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in ("loss", "lr") if n in series] + sorted(n for n in series if n not in ("loss", "lr"))
    fig = Figure(figsize=(8, 2.4 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name in zip(fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0], names):
        steps, values = series[name]
        if name == "loss":
            ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label="raw")
            ax.plot(steps, ema(values), color="tab:blue", linewidth=2, label=f"smoothed (EMA {EMA_WEIGHT})")
            ax.legend(loc="upper right")
        else:
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.axes[-1].set_xlabel("step")
    write_atomically(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return True


# ------------------------------------------------------------------ samples.png


def sample_table(samples: Path) -> tuple[list[int], list[tuple[str, int]], dict]:
    """(validation steps, rows as (prompt, seed) in the order first sampled, {(row, step): file or the
    reason there is none}), from each samples/step-N/ folder's manifest."""
    from ..hooks.pipeline import read_manifest

    steps, rows, cells = [], [], {}
    for folder in sorted(samples.glob("step-*")):
        if not folder.is_dir() or not folder.name[5:].isdigit():
            continue
        step = int(folder.name[5:])
        steps.append(step)
        for entry in read_manifest(folder):
            key = (str(entry.get("prompt", "")), entry.get("seed"))
            if key not in rows:
                rows.append(key)
            file = entry.get("file")  # none: the image was rejected or its prompt blocked
            cells[key, step] = folder / Path(str(file)).name if file else entry.get("status") or "missing"
    return steps, rows, cells


def samples_grid(run_dir: Path, out: Path) -> bool:
    """samples.png: a labelled grid, rows = prompt (and seed, with several images a prompt), columns =
    validation step. False when the run sampled nothing."""
    steps, rows, cells = sample_table(run_dir / "samples")
    if not rows:
        return False
    from PIL import Image, ImageDraw

    cell = min(MAX_CELL, max(_first_image_side(cells), 32))
    sheet = Image.new("RGB", (LABEL + cell * len(steps), HEADER + cell * len(rows)), "white")
    draw, font = ImageDraw.Draw(sheet), _font(12)
    for c, step in enumerate(steps):
        draw.text((LABEL + c * cell + 4, 4), f"step {step}", fill="black", font=font)
    for r, (prompt, seed) in enumerate(rows):
        y = HEADER + r * cell
        label = prompt if sum(1 for p, _ in rows if p == prompt) == 1 else f"{prompt} (seed {seed})"
        draw.multiline_text((4, y + 4), _wrap(label, 30, cell // 16), fill="black", font=font)
        for c, step in enumerate(steps):
            _paste(sheet, draw, font, cells.get(((prompt, seed), step), "missing"), (LABEL + c * cell, y), cell)
    write_atomically(out, lambda tmp: sheet.save(tmp, format="PNG"))
    return True


def _first_image_side(cells: dict) -> int:
    from PIL import Image

    for value in cells.values():
        if isinstance(value, Path) and value.is_file():
            with Image.open(value) as im:
                return max(im.size)
    return MAX_CELL


def _paste(sheet, draw, font, value, at: tuple[int, int], cell: int) -> None:
    """The image scaled into its cell (aspect kept), or a grey cell saying why there is none."""
    from PIL import Image

    x, y = at
    if isinstance(value, Path) and value.is_file():
        with Image.open(value) as im:
            im = im.convert("RGB")
            im.thumbnail((cell, cell))
            sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        return
    draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], fill=(200, 200, 200))
    draw.text((x + 4, y + 4), value if isinstance(value, str) else "missing", fill="black", font=font)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(text: str, width: int, max_lines: int) -> str:
    import textwrap

    lines = textwrap.wrap(text, width) or [""]
    if len(lines) > max(max_lines, 1):
        lines = lines[:max(max_lines, 1)]
        lines[-1] = lines[-1][:width - 3] + "..."
    return "\n".join(lines)
