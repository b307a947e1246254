"""The `finetune` command line: a thin layer over the library; errors are one line each."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import FinetuneError, ReportedElsewhere

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Personalize text-to-image diffusion models from a folder of images and a YAML recipe.")
_state = {"debug": False}


def _quiet_libraries(models: bool) -> None:
    # Library chatter (torchvision fallbacks, progress of weight loading) drowns our own messages.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")

    def one_line(message, category, filename, lineno, file=None, line=None):
        # Python's format is two lines with a library's source path; ours name the file at fault.
        first = (str(message).strip().splitlines() or [category.__name__])[0]
        typer.secho(f"warning: {first}", fg="yellow", err=True)

    warnings.showwarning = one_line
    # torchao (installed for memory.quantize_base) is imported by diffusers whenever present, and
    # on import names every CUDA kernel it cannot load and torch's deprecations of its enums.
    for name in ("bitsandbytes", "transformers", "diffusers", "accelerate", "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not models:
        return  # the commands that read only YAML and images stay free of torch and diffusers
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


@contextlib.contextmanager
def _guard(models: bool = False):
    """One `error:` line per problem instead of a traceback. `models`: the command loads a model."""
    _quiet_libraries(models)
    try:
        yield
    except FinetuneError as e:
        if _state["debug"]:
            raise
        if isinstance(e, ReportedElsewhere):
            raise typer.Exit(1)
        for line in str(e).splitlines() or [type(e).__name__]:
            typer.secho(f"error: {line}", fg="red", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="red", err=True)
        raise typer.Exit(130)
    except typer.Exit:
        raise
    except Exception as e:  # anything unexpected: still one line, the traceback behind --debug
        if _state["debug"]:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        typer.secho(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)", fg="red", err=True)
        raise typer.Exit(1)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _version(value: bool):
    if value:
        typer.echo(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    _state["debug"] = debug


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe file or bundled recipe name."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key: --set training.max_steps=100 (repeatable)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (for logs)."),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="[PATH|latest]",
        help="Continue a run exactly from its last checkpoint: alone, this recipe's latest run; or a run folder "
             "or checkpoint folder."),
    allow_changed_data: bool = typer.Option(
        False, "--allow-changed-data",
        help="With --resume: go on even though the training data changed since the checkpoint (logged; the run "
             "no longer continues exactly)."),
    processes: int = typer.Option(
        1, "--processes", min=1, max=1024,
        help="Train on N processes on this machine, one per GPU (data-parallel; without GPUs, N CPU processes)."),
    c2pa_cert: Optional[Path] = typer.Option(None, "--c2pa-cert", help="PEM certificate chain that signs the "
                                                                      "samples' Content Credentials."),
    c2pa_key: Optional[Path] = typer.Option(None, "--c2pa-key", help="Its PEM private key."),
):
    """Train an adapter from RECIPE. Extra KEY=VALUE arguments override recipe keys."""
    with _guard(models=True):
        from .hooks import with_credential
        from .recipe import load_recipe
        from .train import train as run_training

        if allow_changed_data and not resume:
            raise FinetuneError("--allow-changed-data: only a resumed run (--resume) has earlier data to differ from")
        overrides = [*ctx.args, *set_]
        r, path = load_recipe(recipe, overrides)  # a bad recipe is one line here, not one per process
        r.output.hooks = with_credential(r.output.hooks, c2pa_cert, c2pa_key)
        if processes > 1:
            from .train.launch import launch

            signing = [a for flag, v in (("--c2pa-cert", c2pa_cert), ("--c2pa-key", c2pa_key)) if v for a in (flag, str(v))]
            argv = ["train", recipe, *(a for o in overrides for a in ("--set", o)), *(["--no-progress"] * no_progress),
                    *(["--resume", resume] if resume else []), *(["--allow-changed-data"] * allow_changed_data), *signing]
            raise typer.Exit(launch(processes, argv))
        from .train.distributed import leave_process_group

        try:
            result = run_training(r, path, log=typer.echo, progress=not no_progress, resume=resume,
                                  allow_changed_data=allow_changed_data)
        finally:
            leave_process_group()
        if not _is_main_process():
            raise typer.Exit(143 if result.interrupted else 0)
        typer.echo(f"run folder: {result.run_dir}")
        if result.interrupted:
            import shlex

            world = int(os.environ.get("WORLD_SIZE", "1"))
            again = shlex.join(["finetune", "train", recipe, *overrides, "--resume", str(result.run_dir),
                                *(["--processes", str(world)] if world > 1 else [])])
            typer.echo(f"to continue: {again}")
            raise typer.Exit(130 if result.interrupted == "SIGINT" else 143)


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="Recipe file or bundled recipe name."),
    overrides: List[str] = typer.Argument(None, help="KEY=VALUE overrides."),
):
    """Check a recipe (and its overrides) without loading any model."""
    with _guard():
        from .recipe import load_recipe

        _, path = load_recipe(recipe, overrides or [])
        typer.echo(f"{path}: ok")


@app.command()
def plan(
    recipe: str = typer.Argument(..., help="Recipe file or bundled recipe name."),
    overrides: List[str] = typer.Argument(None, help="KEY=VALUE overrides."),
    vram: Optional[str] = typer.Option(None, "--vram", help="GPU memory to fit, e.g. 12GB (GB read as GiB, as cards "
                                                            "are sold); proposes the cheapest changes that fit."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Host RAM to fit, e.g. 32GB."),
):
    """Predict the peak GPU memory and host RAM of RECIPE's run on its real model, without loading weights
    (built on the meta device from its configs). Exit 0: fits (or no --vram/--ram given); 1: fits only with
    the proposed changes, or the host RAM is short; 2: cannot fit the GPU with any change plan knows."""
    with _guard(models=True):
        from .plan.report import lines
        from .plan.run import exit_code
        from .plan.run import plan as run_plan

        result = run_plan(recipe, overrides or [], vram=vram, ram=ram)
        for line in lines(result):
            typer.echo(line)
        code = exit_code(result)
    raise typer.Exit(code)  # outside the guard: an exit code is not an error


@app.command()
def recipes(name: Optional[str] = typer.Argument(None, help="Show this recipe's YAML.")):
    """List the bundled recipes, or show one."""
    with _guard():
        from .recipe import find_recipe, recipe_dirs

        if name:
            typer.echo(find_recipe(name).read_text(encoding="utf-8"))
            return
        for d in recipe_dirs():
            for f in sorted(d.glob("*.yaml")):
                first = next((ln.lstrip("# ").strip() for ln in f.read_text(encoding="utf-8").splitlines()
                              if ln.startswith("#")), "")
                typer.echo(f"{f.stem:<28} {first}")


@app.command()
def generate(
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="Prompt (repeatable)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file: .txt (a prompt a line), or .csv/.jsonl "
                                                                  "with prompt and optional negative_prompt, seed, width, height, n."),
    make_grid: bool = typer.Option(False, "--grid", help="Also write grid.png of all images."),
    base: str = typer.Option(..., "--base", help="Base model: hub id, diffusers folder, .safetensors or builtin:tiny-sd15."),
    lora: List[str] = typer.Option([], "--lora", help="LoRA file or run folder (repeatable); FILE:WEIGHT sets its weight."),
    n: int = typer.Option(1, "--n", help="Images per prompt (1-1000)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; image k gets seed + k (0 to 2^63-1)."),
    steps: int = typer.Option(25, "--steps", help="Denoising steps (1-1000)."),
    guidance: float = typer.Option(7.5, "--guidance"),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt."),
    width: Optional[int] = typer.Option(None, "--width", help="A multiple of 8, at most 8192 (default: the model's)."),
    height: Optional[int] = typer.Option(None, "--height", help="A multiple of 8, at most 8192 (default: the model's)."),
    out: Path = typer.Option(Path("outputs/generated"), "--out", help="Folder for the images; images already there "
                                                                     "are kept, new ones numbered on after them."),
    family: str = typer.Option("auto", "--family"),
    hook: List[str] = typer.Option([], "--hook", help="Output hook as YAML, e.g. \"{type: prompt_filter, block: [gore]}\" "
                                                       "(repeatable; replaces the defaults)."),
    no_hooks: bool = typer.Option(False, "--no-hooks", help="Turn every output hook off (no provenance, watermark "
                                                             "or Content Credentials)."),
    image_format: str = typer.Option("png", "--format", metavar="[png|jpeg|webp]",
                                     help="Image file format (JPEG and WebP at quality 95)."),
    c2pa_cert: Optional[Path] = typer.Option(None, "--c2pa-cert", help="PEM certificate chain that signs the Content "
                                                                      "Credentials (default: FINETUNE_C2PA_CERT, else a "
                                                                      "local self-signed one)."),
    c2pa_key: Optional[Path] = typer.Option(None, "--c2pa-key", help="Its PEM private key (default: FINETUNE_C2PA_KEY)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="[auto|cuda|cuda:N|mps|cpu]",
                                         help="Where to generate (default auto: CUDA, else Apple MPS, else the CPU)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="[auto|fp16|bf16|fp32]",
                                        help="Precision (default auto: fp16 on a GPU, bf16 for FLUX, fp32 on the CPU; "
                                             "the VAE decodes in fp32 where it overflows in fp16)."),
):
    """Generate images with a base model and optional LoRA adapters; every image passes the output hooks.
    Exit 0: images written; 3: the output hooks refused or rejected every image, so none was written."""
    with _guard(models=True):
        from .generate import generate as run_generate
        from .hooks import with_credential

        hooks = with_credential(_hook_options(hook, no_hooks), c2pa_cert, c2pa_key)
        paths = run_generate(prompts=prompt, base=base, loras=lora, n=n, seed=seed, steps=steps, guidance=guidance,
                             negative=negative, width=width, height=height, out=out, family=family,
                             hooks=hooks, log=typer.echo, prompt_file=prompts, make_grid=make_grid, device=device,
                             dtype=dtype, image_format=image_format)
        for p in paths:
            typer.echo(str(p))
        if not paths:  # not an error in the program, but nothing to show for the run: scripts must see it
            typer.secho(f"error: nothing written: the output hooks refused or rejected every image (see above and "
                        f"{out / 'manifest.jsonl'})", fg="red", err=True)
    if not paths:
        raise typer.Exit(3)  # outside the guard: an exit code is not an error


@app.command("eval")
def eval_(
    target: str = typer.Argument(..., metavar="RUN_OR_ADAPTER",
                                 help="A run folder, one of its checkpoint folders, or a LoRA .safetensors file."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the run's; a LoRA file needs it)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file (.txt, .csv, .jsonl); prompts with a "
                                                                  "trigger word measure the subject, the others the "
                                                                  "prior (default: the run's validation prompts)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Images of the subject or style to compare with "
                                                                      "(default: the run's training images)."),
    trigger: List[str] = typer.Option([], "--trigger", help="Trigger word (repeatable; default: the run's)."),
    n: int = typer.Option(4, "--n", help="Images per prompt (1-1000); FD needs 50 per set, KID is used below that."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the first image (default: the run's validation seed)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default: the run's validation steps)."),
    guidance: Optional[float] = typer.Option(None, "--guidance"),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default: RUN/eval; replaced whole)."),
    family: str = typer.Option("auto", "--family"),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP metric model (hub id, folder, builtin:tiny-clip)."),
    dino: Optional[str] = typer.Option(None, "--dino", help="DINOv2 metric model (hub id, folder, builtin:tiny-dinov2)."),
    inception: bool = typer.Option(False, "--inception", help="Also Inception FID/KID (needs torch-fidelity; its "
                                                               "weights are a pickled .pth file)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="[auto|cuda|cuda:N|mps|cpu]"),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="[auto|fp16|bf16|fp32]"),
):
    """Measure an adapter: the same seeded prompts without and with it; prompt fidelity (CLIP score), subject
    fidelity (CLIP-I, DINO), distance to the reference set (FD-DINOv2, KID), prior drift and diversity. Writes
    eval.json, report.md and a base-vs-adapter grid per prompt; the model card links the report."""
    with _guard(models=True):
        from .eval.report import REPORT
        from .eval.run import EvalOptions, evaluate

        opts = EvalOptions(base=base, family=family, prompts=prompts, reference=reference, triggers=trigger, n=n,
                           seed=seed, steps=steps, guidance=guidance, out=out, clip=clip, dino=dino,
                           inception=inception, device=device, dtype=dtype)
        folder = evaluate(target, opts, log=typer.echo)
        typer.echo(f"report: {folder / REPORT}")


def _hook_options(specs: list[str], off: bool) -> list[dict] | None:
    import yaml

    from .hooks import validate_hook_configs

    if off:
        return []
    if not specs:
        return None
    configs = []
    for spec in specs:
        try:
            raw = yaml.safe_load(spec)
        except yaml.YAMLError:
            raw = None
        if isinstance(raw, str):
            raw = {"type": raw}
        if not isinstance(raw, dict):
            raise FinetuneError(f"--hook {spec!r}: expected a hook name or a mapping like \"{{type: provenance}}\"")
        configs.append(raw)
    try:
        return validate_hook_configs(configs)
    except ValueError as e:
        raise FinetuneError(f"--hook {e}") from None


watermark_app = typer.Typer(help="Find finetune's invisible watermark in images.", no_args_is_help=True)
app.add_typer(watermark_app, name="watermark")


@watermark_app.command("detect")
def watermark_detect(
    images: List[Path] = typer.Argument(..., help="Image files to check."),
    outputs: Path = typer.Option(Path("outputs"), "--outputs", help="Run folders to match payloads against."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Skip, undecoded, any image whose header "
                                                                        "claims more pixels than this (default 40,000,000)."),
):
    """Report each image's watermark payload, bits matched, verdict, and the run/adapter it matches; a file
    that cannot be checked (missing, not an image, corrupt, over --max-pixels) gets its own `skipped:` line.
    Exit 0: every file carries the watermark; 1: all checked, some carry none; 2: some file was skipped."""
    with _guard():
        from .hooks.watermark import detect_report

        if max_pixels is not None and max_pixels < 1:
            raise FinetuneError(f"--max-pixels: must be at least 1, got {max_pixels}")
        lines, code = detect_report(list(images), outputs, max_pixels)
        for line in lines:
            typer.echo(line)
    raise typer.Exit(code)  # outside the guard: an exit code is not an error


provenance_app = typer.Typer(help="Check what made an image: its Content Credentials and its watermark.",
                             no_args_is_help=True)
app.add_typer(provenance_app, name="provenance")


@provenance_app.command("check")
def provenance_check(
    images: List[Path] = typer.Argument(..., help="Image files to check."),
    outputs: Path = typer.Option(Path("outputs"), "--outputs", help="Run folders to match watermark payloads against."),
    trust: List[Path] = typer.Option([], "--trust", help="PEM certificate of a CA whose signers you trust, e.g. "
                                                        "ca.pem of the local credential (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (a list, one object per image)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Skip, undecoded, any image whose header "
                                                                        "claims more pixels than this (default 40,000,000)."),
):
    """Read each image's C2PA Content Credentials and finetune's invisible watermark, and say what made it:
    `made by finetune, credentials intact`, `... credentials stripped, watermark found`, `... credentials
    tampered, watermark found` (or `no watermark found`), or `no sign of finetune`. Exit 0: every image made by finetune with
    intact credentials; 3: every image shows finetune, some with credentials stripped, tampered or replaced;
    1: some image shows no sign of finetune; 2: some file was skipped (2 outranks 1, 1 outranks 3)."""
    with _guard():
        from .hooks.provenance_check import check_report

        if max_pixels is not None and max_pixels < 1:
            raise FinetuneError(f"--max-pixels: must be at least 1, got {max_pixels}")
        lines, code = check_report(list(images), outputs, trust, max_pixels, as_json)
        for line in lines:
            typer.echo(line)
    raise typer.Exit(code)  # outside the guard: an exit code is not an error


dataset_app = typer.Typer(help="Check an image set before training on it.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("check")
def dataset_check(
    path: str = typer.Argument(..., help="Image folder, metadata.jsonl/.csv, or a saved or hub dataset."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Take the data settings and base model from this "
                                                                "recipe (its data.path is replaced by PATH)."),
    resolution: Optional[int] = typer.Option(None, "--resolution",
                                             help="Training size (default: the recipe's, else 512)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model whose tokenizer measures the captions "
                                                            "(default: the recipe's); never downloaded."),
):
    """Report every file that cannot train and every likely mistake, with counts and names. Exit 0: every
    image trains (warnings at most); 1: some would be skipped, or none can train."""
    with _guard():
        from .data.check import check_dataset, load_tokenizer

        data, model, recipe_dir = _dataset_settings(path, recipe, resolution, base)
        tokenizer, why_not = load_tokenizer(model.base if model else base, model.config if model else None)
        report = check_dataset(data, recipe_dir, tokenizer=tokenizer)
        if why_not:
            report.notes.append(f"caption length not checked: {why_not}")
        for line in report.summary():
            typer.echo(line)
        report.raise_if_unusable()
        code = 1 if report.skipped else 0
    raise typer.Exit(code)  # outside the guard: an exit code is not an error


def _dataset_settings(path: str, recipe: str | None, resolution: int | None, base: str | None):
    """(DataConfig, ModelConfig or None) for `dataset check`: the recipe's, or defaults, with the options applied."""
    import json

    from pydantic import ValidationError

    from .recipe import DataConfig, load_recipe

    if recipe:
        overrides = [f"data.path={json.dumps(path)}"]  # JSON: any path reads back as a YAML string
        overrides += [f"data.resolution={resolution}"] if resolution else []
        overrides += [f"model.base={json.dumps(base)}"] if base else []
        r, recipe_file = load_recipe(recipe, overrides)
        return r.data, r.model, recipe_file.parent  # relative data.masks are found beside the recipe
    try:
        return DataConfig(path=path, **({"resolution": resolution} if resolution else {})), None, None
    except ValidationError as e:
        raise FinetuneError(f"--resolution: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; any but localhost needs the access token."),
    port: int = typer.Option(7860, "--port", min=1, max=65535),
    root: List[Path] = typer.Option([], "--root", help="A folder the UI may read and write (repeatable; default: "
                                                        "the current folder). Every path it touches is confined to these."),
    token: Optional[str] = typer.Option(None, "--token", envvar="FINETUNE_UI_TOKEN",
                                        help="Access token (default on a non-local host: generated and printed once)."),
):
    """A local web app: check a dataset, train, watch runs, compare and generate. Runs are `finetune train`
    processes: closing the UI never stops one, and the UI shows runs started from the command line too."""
    with _guard(models=True):
        import importlib.util

        if importlib.util.find_spec("gradio") is None:
            raise FinetuneError('finetune ui needs Gradio: pip install -e ".[ui]"')
        from .ui.app import serve

        serve(host, port, [str(r) for r in root] or [os.getcwd()], token, log=typer.echo)


@app.command("tiny-model")
def tiny_model(folder: Path = typer.Argument(..., help="Where to write the tiny SD1.5 diffusers folder.")):
    """Build the tiny, shape-faithful SD1.5 used by the tests and the quickstart."""
    with _guard(models=True):
        from .tiny_models.sd15 import build_tiny_sd15

        typer.echo(str(build_tiny_sd15(folder)))


def optional_resume(args: list[str]) -> list[str]:
    """`--resume` with no value means the latest run (typer options cannot take an optional value)."""
    out = []
    for i, a in enumerate(args):
        out.append(a)
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a == "--resume" and (nxt is None or nxt.startswith("-") or ("=" in nxt and not Path(nxt).exists())):
            out.append("latest")
    return out


def run() -> None:  # pragma: no cover - the console script and `python -m finetune`
    app(args=optional_resume(sys.argv[1:]), prog_name="finetune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
