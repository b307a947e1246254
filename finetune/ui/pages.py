"""The five pages' components and handlers. Each handler is a few lines over the library; what it
shows comes from the same files and code the command line uses."""

from __future__ import annotations

from pathlib import Path

from .app import REFRESH_S, Context, shown, stamp


# ------------------------------------------------------------------ Datasets


def datasets_page(ctx: Context) -> None:
    import gradio as gr

    from . import datasets

    with gr.Row():
        folder = gr.Textbox(label="Image folder (inside a root)", elem_id="dataset-folder", scale=4,
                            placeholder=str(ctx.roots.folders[0] / "datasets" / "robot"))
        resolution = gr.Number(512, label="Training size", precision=0, elem_id="dataset-resolution", scale=1)
        check = gr.Button("Check", variant="primary", elem_id="dataset-check", scale=1)
    summary = gr.Textbox(label="Dataset check", lines=8, elem_id="dataset-summary", interactive=False)
    findings = gr.Dataframe(headers=["finding", "file", "detail"], label="Findings", elem_id="dataset-findings",
                            interactive=False)
    thumbs = gr.Gallery(label="Images with findings", columns=8, height=220, elem_id="dataset-thumbs")
    buckets = gr.Dataframe(headers=["bucket", "images"], label="Bucket histogram", interactive=False)
    gr.Markdown("### Upload\nImages into the folder above (a new one is made inside the root), each checked as "
                "training data is; a name already there gets a number, never replaced.")
    with gr.Row():
        uploads = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="dataset-uploads")
        add = gr.Button("Add to the folder above, then check it", elem_id="dataset-add")
        added = gr.Textbox(label="Uploaded", lines=3, interactive=False, elem_id="dataset-added")
    gr.Markdown("### Captions\nEdit a caption and press Enter in the table: its `.txt` file is written at once.")
    captions = gr.Dataframe(headers=["image", "caption"], label="Captions", interactive=True,
                            elem_id="dataset-captions", column_count=(2, "fixed"))
    saved = gr.Markdown(elem_id="dataset-saved")

    @shown
    def run_check(path, size):
        c = datasets.check(ctx.roots, path, int(size or 512))
        rows = [[cat, name, detail] for cat, name, detail in c.findings]
        return ("\n".join(c.summary), rows, c.thumbnails, [[k, v] for k, v in c.buckets.items()],
                [list(r) for r in datasets.captions(ctx.roots, path)])

    @shown
    def save(path, table):
        rows = table.values.tolist() if hasattr(table, "values") else table
        before = dict(datasets.captions(ctx.roots, path))
        changed = [(name, text) for name, text in rows if name in before and (text or "") != before[name]]
        for name, text in changed:
            datasets.save_caption(ctx.roots, path, name, text or "")
        return f"saved {len(changed)} caption(s)" if changed else "no caption changed"

    @shown
    def upload(path, files, size):
        target, lines = datasets.save_uploads(ctx.roots, path, files)
        return ("\n".join(lines), *run_check(str(target), size))

    check.click(run_check, [folder, resolution], [summary, findings, thumbs, buckets, captions])
    add.click(upload, [folder, uploads, resolution], [added, summary, findings, thumbs, buckets, captions])
    captions.input(save, [folder, captions], saved)


# ------------------------------------------------------------------ Train


def train_page(ctx: Context) -> None:
    import gradio as gr

    from ..recipe import load_recipe
    from . import form

    names = _bundled()
    fields = form.form_fields()
    with gr.Row():
        recipe = gr.Dropdown(names, value="quickstart" if "quickstart" in names else None, allow_custom_value=True,
                             label="Recipe (a bundled name, or a recipe file inside a root)", elem_id="train-recipe")
        load = gr.Button("Load", elem_id="train-load")
    initial = form.values(load_recipe(recipe.value)[0], fields) if recipe.value else [None] * len(fields)
    components = []
    for section in form.SECTIONS:
        with gr.Accordion(section, open=section in ("data", "training")):
            for f, value in ((f, v) for f, v in zip(fields, initial) if f.key.startswith(section + ".")):
                components.append(_component(f, value))
    extra = gr.Textbox(label="More overrides (key.path=value, one a line)", lines=3, elem_id="train-extra")
    with gr.Row():
        validate = gr.Button("Validate", elem_id="train-validate")
        plan = gr.Button("Plan memory", elem_id="train-plan")
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
    report = gr.Textbox(label="Result", lines=8, interactive=False, elem_id="train-report")

    def loaded(name):
        return load_recipe(_recipe_arg(ctx, name))[0]

    @shown
    def fill(name):
        return form.values(loaded(name), fields)

    def overrides(name, values, more):
        return form.overrides(loaded(name), fields, values) + [ln.strip() for ln in (more or "").splitlines() if ln.strip()]

    def check(name, more, *values):
        ov = overrides(name, list(values), more)
        _, path = load_recipe(_recipe_arg(ctx, name), ov)
        return f"{path}: ok" + ("".join(f"\n  {o}" for o in ov) if ov else "")

    def estimate(name, more, *values):
        from ..plan.report import lines
        from ..plan.run import plan as run_plan

        return "\n".join(lines(run_plan(_recipe_arg(ctx, name), overrides(name, list(values), more))))

    def begin(name, more, *values):
        job = ctx.jobs.start(_recipe_arg(ctx, name), overrides(name, list(values), more))
        return f"{job.status}: {job.name} -> {ctx.roots.display(job.run_dir)} (see Runs)"

    load.click(fill, recipe, components)
    recipe.change(fill, recipe, components)
    for button, handler in ((validate, check), (plan, estimate), (start, begin)):
        button.click(_problems(handler, fields), [recipe, extra, *components], [report, *components])


def _problems(handler, fields):
    """The result box and each field's help line: a recipe's problems are several lines, each naming
    its key, and each is shown in the box and under its field too (the field's help otherwise)."""
    import gradio as gr

    from ..errors import RecipeError

    def run(*args):
        try:
            result, problems = handler(*args), []
        except RecipeError as e:
            result, problems = "\n".join(e.problems), e.problems
        return (result, *[gr.update(info=_field_problem(f, problems) or f.help[:300] or None) for f in fields])
    return shown(run)


def _field_problem(f, problems: list[str]) -> str | None:
    for line in problems:
        head, sep, why = line.partition(f" {f.key}: ")
        if sep:
            return f"⚠ {why}"
    return None


def _component(f, value):
    import gradio as gr

    label = f.key.split(".", 1)[1]
    common = dict(value=value, info=f.help[:300] or None, elem_id="field-" + f.key.replace(".", "-"))
    if f.kind == "bool":
        return gr.Checkbox(label=label, **common)
    if f.kind == "choice":
        unset = [("(unset)", "")] if f.optional or "" == value else []  # None in the recipe: "" in the form
        return gr.Dropdown(unset + [(str(c), c) for c in f.choices], label=label, allow_custom_value=False, **common)
    if f.kind in ("int", "number") and not f.optional:
        return gr.Number(label=label, precision=0 if f.kind == "int" else None, **common)
    return gr.Textbox(label=label, lines=3 if f.kind == "lines" else 1, **common)


def _bundled() -> list[str]:
    from ..recipe import recipe_dirs

    return sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})


def _recipe_arg(ctx: Context, name: str) -> str:
    """A bundled name as it is; anything that looks like a path must be inside a root."""
    name = (name or "").strip()
    if not name:
        from ..errors import FinetuneError
        raise FinetuneError("choose a recipe")
    if "/" in name or "\\" in name or name.endswith((".yaml", ".yml")):
        return str(ctx.roots.confine(name))
    return name


# ------------------------------------------------------------------ Runs


def runs_page(ctx: Context) -> None:
    import gradio as gr

    from .runs import find_runs, run_info

    table = gr.Dataframe(headers=["run", "status", "step", "loss", "ETA", "folder"], label="Runs",
                         interactive=False, elem_id="runs-table")
    with gr.Row():
        chosen = gr.Dropdown([], label="Run", allow_custom_value=True, elem_id="runs-chosen", scale=4)
        stop = gr.Button("Stop (saves a checkpoint)", elem_id="runs-stop", scale=1)
        resume = gr.Button("Resume", elem_id="runs-resume", scale=1)
    action = gr.Markdown(elem_id="runs-action")
    progress = gr.Markdown(elem_id="runs-progress")
    with gr.Row():
        loss = gr.LinePlot(x="step", y="loss", title="loss", height=220, elem_id="runs-loss")
        lr = gr.LinePlot(x="step", y="lr", title="learning rate", height=220)
    samples = gr.Gallery(label="Samples (newest last)", columns=6, height=260, elem_id="runs-samples")
    files = gr.File(label="Files", file_count="multiple", interactive=False)
    log = gr.Textbox(label="Log (last lines)", lines=6, interactive=False, elem_id="runs-log")
    card = gr.Markdown(elem_id="runs-card")

    def statuses() -> dict:
        return {str(j.run_dir): j for j in ctx.jobs.jobs()}

    def listing():
        jobs, rows, paths = statuses(), [], []
        for r in find_runs(ctx.roots):
            status = _status(r, jobs.get(str(r.path)))
            rows.append([r.name, status, f"{r.step}/{r.max_steps or '?'}", f"{r.losses[-1][1]:.4f}" if r.losses else "-",
                         _eta(r.eta_s) if status == "running" else "-", ctx.roots.display(r.path)])
            paths.append(str(r.path))
        for j in (j for j in jobs.values() if j.status == "queued" and not j.run_dir.exists()):
            rows.append([j.name, "queued", "-", "-", "-", ctx.roots.display(j.run_dir)])
            paths.append(str(j.run_dir))
        # A choice's value is the folder itself: what the table shows is relative to a root.
        return rows, gr.update(choices=[(f"{row[0]}  ({row[5]})", p) for row, p in zip(rows, paths)])

    @shown
    def details(folder):
        import pandas as pd

        if not folder:
            return "", None, None, [], None, "", ""
        path = ctx.roots.confine(folder)
        r, job = run_info(path), statuses().get(str(path))
        status = _status(r, job)
        text = (f"**{r.name}** ({r.method} on `{r.base}`): {status}, step {r.step} of {r.max_steps or '?'}" +
                (f", {r.images_per_s:.2f} images/s" if r.images_per_s else "") +
                (f", about {_eta(r.eta_s)} left" if r.eta_s and status == "running" else "") +
                (f"; best checkpoint {r.best.get('checkpoint')} ({r.best.get('metric')})" if r.best else "") +
                ("; evaluated: `eval/report.md`" if r.eval_report else ""))
        card = r.card.read_text(encoding="utf-8") if r.card else ""
        if r.eval_report:  # `finetune eval`'s numbers above the card
            card = r.eval_report.read_text(encoding="utf-8") + "\n\n---\n\n" + card
        return (text, pd.DataFrame(r.losses, columns=["step", "loss"]), pd.DataFrame(r.lrs, columns=["step", "lr"]),
                [str(p) for p in r.samples], [str(p) for p in r.files] or None,
                ctx.jobs.log_tail(path) if job else "", card)

    @shown
    def stop_run(folder):
        ctx.jobs.stop(ctx.roots.confine(folder))
        return f"stopping {folder}: it saves a checkpoint, then exits"

    @shown
    def resume_run(folder):
        job = ctx.jobs.resume(ctx.roots.confine(folder))
        return f"{job.status}: resuming {folder}"

    timer = gr.Timer(REFRESH_S)
    timer.tick(listing, None, [table, chosen], show_progress="hidden")
    outputs = [progress, loss, lr, samples, files, log, card]
    timer.tick(details, chosen, outputs, show_progress="hidden")
    chosen.change(details, chosen, outputs)
    stop.click(stop_run, chosen, action)
    resume.click(resume_run, chosen, action)


def _status(run, job) -> str:
    """The job's status while the UI knows the process; else what the folder says (a CLI run)."""
    if job is not None:
        return job.status
    return "finished" if run.finished else "stopped" if run.checkpoints else "-"


def _eta(seconds) -> str:
    if not seconds:
        return "-"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


# ------------------------------------------------------------------ Generate


def generate_page(ctx: Context) -> None:
    import gradio as gr

    with gr.Row():
        base = gr.Textbox("builtin:tiny-sd15", label="Base model (hub id, folder inside a root, builtin:...)",
                          elem_id="gen-base")
        adapters = gr.Textbox(label="Adapters: run folders or LoRA files inside a root, one a line; FILE:WEIGHT "
                                    "sets a weight", lines=2, elem_id="gen-adapters")
    prompt = gr.Textbox(label="Prompt", elem_id="gen-prompt")
    negative = gr.Textbox(label="Negative prompt")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0)
        steps = gr.Number(25, label="Steps", precision=0, elem_id="gen-steps")
        guidance = gr.Number(7.5, label="Guidance")
        width = gr.Number(None, label="Width", precision=0, elem_id="gen-width")
        height = gr.Number(None, label="Height", precision=0, elem_id="gen-height")
    block = gr.Textbox(label="Blocked words (a prompt filter before the watermark, provenance and C2PA hooks; one a line)",
                       lines=2, elem_id="gen-block")
    go = gr.Button("Generate", variant="primary", elem_id="gen-go")
    images = gr.Gallery(label="Images", columns=4, height=300, elem_id="gen-images")
    said = gr.Textbox(label="What happened", lines=4, interactive=False, elem_id="gen-log")
    gr.Markdown("### Provenance check\nUpload images to read their Content Credentials and find finetune's "
                "invisible watermark in them.")
    upload = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="wm-upload")
    verdict = gr.Textbox(label="What made them", lines=6, interactive=False, elem_id="wm-verdict")

    @shown
    def make(base_, adapters_, prompt_, negative_, seed_, steps_, guidance_, w, h, block_, progress=gr.Progress()):
        from ..generate import generate
        from ..hooks import DEFAULT_HOOKS, validate_hook_configs

        words = [w.strip() for w in (block_ or "").splitlines() if w.strip()]
        hooks = validate_hook_configs([{"type": "prompt_filter", "block": words}, *DEFAULT_HOOKS]) if words else None
        lines = []
        loras = [_adapter(ctx, a) for a in (adapters_ or "").splitlines() if a.strip()]
        progress(0, desc="loading the model")
        out = ctx.roots.confine(ctx.state / "generated", must_exist=False)
        written = generate([prompt_], base=_base(ctx, base_), loras=loras, seed=int(seed_ or 0), steps=int(steps_ or 25),
                           guidance=float(guidance_ or 0), negative=negative_ or None, width=int(w) if w else None,
                           height=int(h) if h else None, out=out, log=lines.append, hooks=hooks)
        lines += [f"written: {ctx.roots.display(p)}" for p in written] or ["nothing written (see above)"]
        return [str(p) for p in written], "\n".join(lines)

    @shown
    def detect(uploaded):
        from ..hooks.provenance_check import check_report

        paths = [ctx.roots.confine(getattr(f, "name", f)) for f in uploaded or []]
        return "\n".join(check_report(paths, ctx.outputs)[0]) if paths else ""

    go.click(make, [base, adapters, prompt, negative, seed, steps, guidance, width, height, block], [images, said])
    upload.upload(detect, upload, verdict)


def _base(ctx: Context, base: str) -> str:
    """Hub ids and builtins as they are; anything that exists as a path must be inside a root."""
    base = (base or "").strip()
    if base.startswith("builtin:") or (base.count("/") == 1 and not Path(base).exists()):
        return base
    return str(ctx.roots.confine(base))


def _adapter(ctx: Context, spec: str) -> str:
    spec = spec.strip()
    path, sep, weight = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        return f"{ctx.roots.confine(path)}:{weight}"
    return str(ctx.roots.confine(spec))


# ------------------------------------------------------------------ Compare


def compare_page(ctx: Context) -> None:
    import gradio as gr

    gr.Markdown("Runs (or checkpoints) x prompts, every cell from the same seed: the rows differ only by the adapter.")
    runs = gr.Textbox(label="Run or checkpoint folders inside a root, one a line", lines=3, elem_id="cmp-runs")
    prompts = gr.Textbox(label="Prompts, one a line", lines=3, elem_id="cmp-prompts")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0)
        steps = gr.Number(25, label="Steps", precision=0)
    go = gr.Button("Compare", variant="primary", elem_id="cmp-go")
    sheet = gr.Image(label="Runs (rows) x prompts (columns)", elem_id="cmp-grid", type="filepath")
    said = gr.Textbox(label="What happened", lines=3, interactive=False)

    @shown
    def compare(runs_, prompts_, seed_, steps_):
        from .compare import compare_grid

        folders = [ctx.roots.confine(r.strip()) for r in (runs_ or "").splitlines() if r.strip()]
        texts = [p.strip() for p in (prompts_ or "").splitlines() if p.strip()]
        out = ctx.roots.confine(ctx.state / "compare" / stamp(), must_exist=False)
        path, lines = compare_grid(folders, texts, int(seed_ or 0), int(steps_ or 25), out)
        return str(path), "\n".join(lines)

    go.click(compare, [runs, prompts, seed, steps], [sheet, said])
