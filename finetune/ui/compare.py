"""The Compare page: each run (or checkpoint) samples every prompt from the same seeds with its own
base model, through the output hooks (`finetune generate`), and the images make one grid, a row a
run and a column a prompt."""

from __future__ import annotations

from pathlib import Path

from ..errors import FinetuneError

MAX_CELLS = 64  # runs x prompts: a comparison, not a batch job


def compare_grid(folders: list[Path], prompts: list[str], seed: int, steps: int, out: Path) -> tuple[Path, list[str]]:
    """(the grid's path, what happened) for LoRA runs or checkpoints x prompts."""
    from PIL import Image

    from ..eval.inputs import run_adapter, run_recipe
    from ..generate import generate
    from ..train.sampling import grid

    if not folders or not prompts:
        raise FinetuneError("give at least one run and one prompt")
    if len(folders) * len(prompts) > MAX_CELLS:
        raise FinetuneError(f"{len(folders)} runs x {len(prompts)} prompts: at most {MAX_CELLS} images a comparison")
    recipes = [run_recipe(f)[0] for f in folders]  # every folder checked before anything loads
    for recipe, folder in zip(recipes, folders):
        if run_adapter(recipe, folder).kind != "lora":
            raise FinetuneError(f"{folder}: Compare takes LoRA runs; use finetune eval for {recipe.method.type}")
    cells, lines = [], []
    for i, (recipe, folder) in enumerate(zip(recipes, folders)):
        size = recipe.data.resolution
        said = []
        written = generate(prompts, base=recipe.model.base, loras=[str(folder)], seed=seed, steps=steps,
                           guidance=recipe.validation.guidance_scale, width=size, height=size,
                           out=out / f"{i:02d}-{folder.name}", log=said.append)
        by_prompt = {p.name.split("-", 1)[0]: p for p in written}
        lines += [f"{folder.name}: {line}" for line in said]
        for k in range(len(prompts)):
            path = by_prompt.get(f"{k:02d}")
            cells.append(Image.open(path) if path else Image.new("RGB", (size, size), (128, 128, 128)))
    return _emit_grid(grid(cells, columns=len(prompts)), out, folders), \
        lines + [f"{len(folders)} runs x {len(prompts)} prompts from seed {seed}"]


def _emit_grid(sheet, out: Path, folders: list[Path]) -> Path:
    """The grid is an image we emit too: it passes the default output hooks, as `generate --grid`'s does."""
    from ..hooks import OutputImage, Provenance, build_pipeline
    from ..hooks.pipeline import write_outputs

    hooks = build_pipeline(None)
    item = hooks.process(OutputImage(sheet, Provenance(prompt=f"comparison of {len(folders)} runs", kind="grid",
                                                       width=sheet.width, height=sheet.height)))
    written = write_outputs([(out / "grid.png", item)], out)
    if not written:
        raise FinetuneError("the output hooks rejected the comparison grid")
    return written[0]
