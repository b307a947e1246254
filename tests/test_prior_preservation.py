"""Prior preservation: class images are generated once (never black) and really enter the loss."""

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.data.prior import class_image_files, ensure_class_images
from finetune.hooks.base import Hook
from finetune.recipe import validate
from finetune.recipe.schema import PriorPreservationConfig
from finetune.train import train

from .helpers import draw_subject, make_image_folder, tiny_recipe, step_rows


def _pipe(model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model, safety_checker=None)


def test_class_images_generated_once_and_reused(tiny_sd15, tmp_path):
    cfg = PriorPreservationConfig(enabled=True, class_prompt="a photo of a ball", class_data_dir=str(tmp_path / "cls"),
                                  num_class_images=5, sample_batch_size=2, num_inference_steps=2)
    logs = []
    files = ensure_class_images(_pipe(tiny_sd15), cfg, 64, logs.append, progress=False)
    assert len(files) == 5 and all(Image.open(f).size == (64, 64) for f in files)
    assert any("generating 5 class images" in line for line in logs)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = ensure_class_images(_pipe(tiny_sd15), cfg, 64, logs.append, progress=False)
    assert again == files and {f: f.stat().st_mtime_ns for f in again} == stamps
    # Asking for more tops the folder up; the first five are kept as they are.
    more = ensure_class_images(_pipe(tiny_sd15), cfg.model_copy(update={"num_class_images": 7}), 64, logs.append, False)
    assert len(more) == 7 and set(files) < set(more)


class _FilteredPipe:
    """The real tiny pipeline behind a stand-in safety filter that blacks out some outputs,
    the way StableDiffusionSafetyChecker replaces flagged images."""

    def __init__(self, pipe, black_calls: set[int], every_image: bool = False):
        self.pipe, self.black_calls, self.calls, self.every_image = pipe, black_calls, 0, every_image

    def set_progress_bar_config(self, **kw):
        self.pipe.set_progress_bar_config(**kw)

    def __call__(self, *args, **kwargs):
        out = self.pipe(*args, **kwargs)
        if self.calls in self.black_calls:
            for i in range(len(out.images) if self.every_image else 1):
                out.images[i] = Image.new("RGB", out.images[i].size)
        self.calls += 1
        return out


def test_black_class_images_are_regenerated_or_left_out(tiny_sd15, tmp_path):
    cfg = PriorPreservationConfig(enabled=True, class_prompt="a ball", class_data_dir=str(tmp_path / "cls"),
                                  num_class_images=2, sample_batch_size=2, num_inference_steps=2)
    logs = []
    # Call 0 (the batch) has a black first image; call 1 (its first retry) is black again; call 2 is fine.
    files = ensure_class_images(_FilteredPipe(_pipe(tiny_sd15), {0, 1}), cfg, 64, logs.append, progress=False)
    assert len(files) == 2
    assert all(np.asarray(Image.open(f)).max() > 8 for f in files)
    assert any("2 class image(s) rejected (2 black image)" in line and "0 left out" in line for line in logs)
    # Always black: left out and counted, never written.
    cfg2 = cfg.model_copy(update={"class_data_dir": str(tmp_path / "cls2")})
    files = ensure_class_images(_FilteredPipe(_pipe(tiny_sd15), set(range(100)), every_image=True), cfg2, 64,
                                logs.append, False)
    assert files == [] and class_image_files(tmp_path / "cls2") == []
    assert "6 class image(s) rejected (6 black image) and retried with other seeds; 2 left out" in logs[-1]


class _RejectSeeds(Hook):
    """A content screen that rejects the images of some seeds, as an image classifier would."""

    name = "reject_seeds"
    screens_content = True

    def __init__(self, seeds):
        self.seeds, self.seen = seeds, []

    def process(self, item):
        self.seen.append(item.provenance.seed)
        if item.provenance.seed in self.seeds:
            return item.reject(self.name, "flagged")
        return super().process(item)


def test_class_images_pass_the_recipes_content_screens(tiny_sd15, tmp_path):
    from finetune.hooks.pipeline import OutputPipeline

    cfg = PriorPreservationConfig(enabled=True, class_prompt="a ball", class_data_dir=str(tmp_path / "cls"),
                                  num_class_images=2, sample_batch_size=2, num_inference_steps=2, seed=5)
    screen = _RejectSeeds({5})
    logs = []
    files = ensure_class_images(_pipe(tiny_sd15), cfg, 64, logs.append, False, screen=OutputPipeline([screen]))
    # Seed 5 was rejected and retried with another seed; seed 6 passed; nothing flagged was written.
    assert len(files) == 2 and screen.seen == [5, 5 + 1_000_003, 6]
    assert [f.name for f in files] == ["class-00000-seed1000008.png", "class-00001-seed6.png"]
    assert any("1 class image(s) rejected (1 reject_seeds: flagged)" in line for line in logs)


def _tiny_checker(folder):
    from .test_safety_checker import make_checker

    return make_checker(folder, always_flag=True)


def test_training_screens_class_images_with_the_recipes_safety_checker(tiny_sd15, tmp_path):
    """A flagged class image is never kept, blurred or replaced: even with action blur, it is
    regenerated and finally left out; with every image flagged the run refuses to train."""
    import pytest

    from finetune.errors import FinetuneError

    data = make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),))
    r = tiny_recipe(tiny_sd15, data, tmp_path / "out", training__max_steps=1)
    r["prior_preservation"] = {"enabled": True, "class_prompt": "a photo of a ball", "class_data_dir": str(tmp_path / "cls"),
                               "num_class_images": 1, "num_inference_steps": 2}
    r["output"]["hooks"] = [{"type": "safety_checker", "weights": str(_tiny_checker(tmp_path / "checker")), "action": "blur"},
                            {"type": "watermark"}]
    logs = []
    with pytest.raises(FinetuneError, match="no usable class images"):
        train(validate(r, "test"), log=logs.append, progress=False)
    assert class_image_files(tmp_path / "cls") == []
    assert any("rejected (3 safety_checker: flagged by the safety checker; blurred)" in line and "1 left out" in line
               for line in logs)
    # A class prompt the recipe's prompt filter refuses cannot make class images: said before generating.
    r["output"]["hooks"] = [{"type": "prompt_filter", "block": ["ball"]}]
    with pytest.raises(FinetuneError, match=r"prior_preservation\.class_prompt: 'a photo of a ball' is refused by output hook prompt_filter"):
        train(validate(r, "test"), log=logs.append, progress=False)


def _class_folder(folder, seeds):
    folder.mkdir(parents=True)
    for i, seed in enumerate(seeds):
        draw_subject(seed).save(folder / f"c{i}.png")
    return folder


def _run(tmp_path, model, name, class_dir, weight):
    data = make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),))
    r = tiny_recipe(model, data, tmp_path / "out", training__max_steps=3)
    r["output"]["run_name"] = name
    r["prior_preservation"] = {"enabled": True, "class_prompt": "a photo of a ball", "class_data_dir": str(class_dir),
                               "num_class_images": 2, "prior_loss_weight": weight}
    result = train(validate(r, "test"), log=lambda *_: None, progress=False)
    return load_file(result.run_dir / "pytorch_lora_weights.safetensors"), result


def test_class_examples_enter_the_loss(tiny_sd15, tmp_path):
    a = _class_folder(tmp_path / "class-a", [10, 11])
    b = _class_folder(tmp_path / "class-b", [20, 21])
    # Same seed, same instance images; only the class images differ.
    wa, ra = _run(tmp_path, tiny_sd15, "a", a, 1.0)
    wb, _ = _run(tmp_path, tiny_sd15, "b", b, 1.0)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa), "class images had no effect on training"
    # Control: with the prior weight at 0 the class images cannot matter.
    za, _ = _run(tmp_path, tiny_sd15, "za", a, 0.0)
    zb, _ = _run(tmp_path, tiny_sd15, "zb", b, 0.0)
    assert all(torch.equal(za[k], zb[k]) for k in za)
    rows = step_rows(ra.run_dir)
    assert all("prior_loss" in r for r in rows)


def test_prior_preservation_needs_a_class_prompt(tmp_path):
    import pytest

    from finetune.errors import RecipeError

    with pytest.raises(RecipeError, match=r"prior_preservation\.class_prompt: required"):
        validate({"data": {"path": "x"}, "prior_preservation": {"enabled": True, "class_data_dir": "c"}}, "r.yaml")


def test_a_run_that_finds_its_class_images_trains_like_the_run_that_made_them(tiny_sd15, tmp_path):
    """Generating class images must not shift the training RNG: otherwise a second run (or a
    resumed one, which finds them on disk) would train differently from the first."""
    data = make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),))
    weights = []
    for name in ("made", "found"):
        r = tiny_recipe(tiny_sd15, data, tmp_path / "out", training__max_steps=2)
        r["output"]["run_name"] = name
        r["prior_preservation"] = {"enabled": True, "class_prompt": "a photo of a ball", "num_class_images": 2,
                                   "class_data_dir": str(tmp_path / "cls"), "num_inference_steps": 2}
        logs = []
        result = train(validate(r, "test"), log=logs.append, progress=False)
        assert any("generating 2 class images" in x for x in logs) == (name == "made")
        weights.append(load_file(result.run_dir / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
