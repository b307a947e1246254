"""What `finetune eval` measures, worked out and checked before any model loads: the adapter (a run
folder, one of its checkpoints, or a LoRA file), the base model, the prompts (with the trigger words,
and without them for the prior), the reference images, the metric models and the sampling settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FinetuneError
from ..prompts import PromptRow, excerpt

LORA_FILE = "pytorch_lora_weights.safetensors"
MAX_REFERENCE = 1000  # reference images read: plenty for every metric, bounded memory


@dataclass
class Adapter:
    """How the adapted pipeline is made from the base one: `kind` is a method type."""
    kind: str  # "lora" | "textual_inversion" | "dreambooth"
    path: Path  # the LoRA file or folder, the embeddings folder, the DreamBooth model folder
    token: str | None = None  # textual inversion: the placeholder token


@dataclass
class EvalInputs:
    target: str
    base: str
    family: str  # the recipe's model.family ("auto" for a bare adapter)
    adapter: Adapter
    run_dir: Path | None
    out: Path
    subject: list[PromptRow]
    prior: list[PromptRow]
    triggers: list[str]
    reference: list = field(default_factory=list)  # Examples
    reference_where: str | None = None


def find_adapter(target: str) -> tuple[Adapter | None, Path | None]:
    """(the adapter if `target` is a bare file or folder, the run folder if it is a run or checkpoint)."""
    p = Path(target).expanduser()
    if not p.exists():
        raise FinetuneError(f"{target}: no such run folder or adapter file")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise FinetuneError(f"{target}: not a .safetensors file; pickled adapters are not loaded")
        return Adapter("lora", p), None
    if (p / "recipe.yaml").is_file():
        return None, p
    if (p / "checkpoint.json").is_file() and (p.parent.parent / "recipe.yaml").is_file():
        return None, p  # a checkpoint: its own files, the run's recipe
    if (p / LORA_FILE).is_file():
        return Adapter("lora", p), None
    raise FinetuneError(f"{target}: neither a run folder (no recipe.yaml), a checkpoint folder nor a folder "
                        f"holding {LORA_FILE}")


def run_recipe(folder: Path):
    """The resolved recipe a run saved (a checkpoint's run: two folders up)."""
    from ..recipe.loader import load_raw, validate

    run_dir = folder if (folder / "recipe.yaml").is_file() else folder.parent.parent
    return validate(load_raw(run_dir / "recipe.yaml"), str(run_dir / "recipe.yaml")), run_dir


def run_adapter(recipe, folder: Path) -> Adapter:
    """The adapter a run (or checkpoint) folder holds, as its method saved it."""
    m = recipe.method
    if m.type not in ("lora", "textual_inversion", "dreambooth"):
        raise FinetuneError(f"{folder}: finetune eval does not yet evaluate {m.type} runs (lora, textual_inversion "
                            "and dreambooth runs it does)")
    if m.type == "textual_inversion":
        return Adapter("textual_inversion", folder, token=m.placeholder_token)
    if m.type == "dreambooth":
        if not (folder / "model").is_dir():
            raise FinetuneError(f"{folder}: this DreamBooth run kept no diffusers model folder (model/); "
                                "output.formats must include diffusers for finetune eval")
        return Adapter("dreambooth", folder / "model")
    if getattr(m, "variant", None) == "loha":
        raise FinetuneError(f"{folder}: a LoHa run has no file diffusers loads (diffusers has no LoHa loader), so "
                            "finetune eval cannot sample it yet; its kohya file loads in ComfyUI, AUTOMATIC1111 and Forge")
    if not (folder / LORA_FILE).is_file():
        raise FinetuneError(f"{folder}: no {LORA_FILE} (output.formats must include diffusers for finetune eval)")
    return Adapter("lora", folder)


def trigger_words(recipe) -> list[str]:
    """The words that call the adapter up: output.trigger_words, and a textual inversion's token."""
    words = list(recipe.output.trigger_words)
    token = getattr(recipe.method, "placeholder_token", None)
    if token and token not in words:
        words.append(token)
    return words


def has_trigger(prompt: str, triggers: list[str]) -> bool:
    return any(t.lower() in prompt.lower() for t in triggers)


def without_trigger(prompt: str, triggers: list[str], class_words: dict[str, str]) -> str:
    """`prompt` as the base model would be asked for the class: "a photo of sks robot" -> "a photo of
    robot". A trigger of two words ("sks robot") is read as identifier + class and keeps the class; a
    textual-inversion token becomes its initializer word; any other trigger is left out."""
    for t in triggers:
        words = t.split()
        keep = class_words.get(t, words[-1] if len(words) == 2 else "")
        prompt = re.sub(re.escape(t), keep, prompt, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", prompt).strip(" ,")


def split_prompts(rows: list[PromptRow], triggers: list[str], recipe) -> tuple[list[PromptRow], list[PromptRow]]:
    """(subject rows, prior rows). Rows with a trigger word are the subject's; rows without, the prior's.
    No row without one: the prior is the recipe's class prompt, else the subject rows without their
    trigger words. No trigger words known: every row is the subject's and the prior is not measured."""
    if not triggers:
        return rows, []
    subject = [r for r in rows if has_trigger(r.prompt, triggers)]
    prior = [r for r in rows if not has_trigger(r.prompt, triggers)]
    if not subject:
        raise FinetuneError(f"no prompt holds a trigger word ({', '.join(map(repr, triggers))}); the subject "
                            "cannot be measured without one")
    if prior:
        return subject, prior
    class_prompt = recipe and recipe.prior_preservation.class_prompt
    if class_prompt:
        return subject, [PromptRow(class_prompt)]
    class_words = {recipe.method.placeholder_token: recipe.method.initializer_token} \
        if recipe and recipe.method.type == "textual_inversion" else {}
    derived = dict.fromkeys(without_trigger(r.prompt, triggers, class_words) for r in subject)
    return subject, [PromptRow(p) for p in derived if p]


def reference_examples(data, base_dir: Path | None, log) -> list:
    """The reference images `data` (a DataConfig) names, at most MAX_REFERENCE; none is an error."""
    from ..data import discover_examples

    try:
        examples = discover_examples(data, base_dir, log=log)
    except FinetuneError as e:
        raise FinetuneError(f"reference images: {str(e).replace('data.path: ', '')}") from None
    if len(examples) > MAX_REFERENCE:
        log(f"reference images: the first {MAX_REFERENCE} of {len(examples)} are used")
    return examples[:MAX_REFERENCE]


def prompt_rows(prompts_file: Path | None, recipe) -> list[PromptRow]:
    from ..prompts import read_prompt_file

    if prompts_file is not None:
        return read_prompt_file(prompts_file)
    if recipe is None or not recipe.validation.prompts:
        raise FinetuneError("no prompts to evaluate: give --prompts FILE (a prompt a line, or .csv/.jsonl)" +
                            ("" if recipe is None else "; the run's recipe has no validation.prompts"))
    return [PromptRow(p, negative_prompt=recipe.validation.negative_prompt) for p in recipe.validation.prompts]


def check_family(recipe, base: str, family: str, run_dir: Path) -> None:
    """A --base of another family than the one the run trained on: one line, before anything loads."""
    from ..recipe.schema import ModelConfig
    from ..train.setup import resolve_family

    trained, _ = resolve_family(recipe.model)
    given, _ = resolve_family(ModelConfig(base=base, family=family))
    if given.name != trained.name:
        raise FinetuneError(f"--base {excerpt(base)} is a {given.name} model; {run_dir} was trained on "
                            f"{recipe.model.base} ({trained.name}): its adapter does not fit")
