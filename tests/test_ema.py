"""training.ema: the average diffusers' EMAModel keeps of the trained weights equals one computed by
hand from the weights after each step; its files (every format the method writes, in ema/) load in
diffusers and differ from the trained ones; validation samples with it without disturbing training;
a resumed run ends with exactly the average of an uninterrupted one."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune.train import checkpoint as ckpt
from finetune.train import ema as ema_module
from finetune.train import train

from .helpers import make_image_folder, tiny_recipe, train_quietly

# Updates at steps 2, 4, ..., 10: decays 0, 0 (update_after_step), 2/11, then 3/12 and 4/13 capped at 0.25.
EMA = {"decay": 0.25, "update_every": 2, "update_after_step": 1, "validate_with": "both"}
STEPS, SAVE_AT = 10, 5
PROMPT = "a photo of sks ball"


def _recipe(model, tmp, ema=EMA, **overrides):
    data = make_image_folder(tmp / "data", n=2, sizes=((64, 64),))
    settings = {"training__max_steps": STEPS, "training__learning_rate": 1e-2, "output__save_every_n_steps": SAVE_AT}
    r = tiny_recipe(model, data, tmp / "out", **{**settings, **overrides})
    r["validation"].update(prompts=[PROMPT], every_n_steps=SAVE_AT)
    if ema is not None:
        r["training"]["ema"] = dict(ema)
    return r


class Recorder:
    """The trained weights after every optimizer step, and the run's Ema, seen from Ema.after_step."""

    def __init__(self, monkeypatch):
        self.snapshots, self.emas = {}, []
        real = ema_module.Ema.after_step

        def after_step(ema, step):
            if not self.emas or self.emas[-1] is not ema:
                self.emas.append(ema)
            self.snapshots[step] = [p.detach().clone() for p in ema.params]
            real(ema, step)

        monkeypatch.setattr(ema_module.Ema, "after_step", after_step)


def hand_ema(snapshots: dict, cfg: dict) -> list[torch.Tensor]:
    """diffusers' documented rule: the n-th update decays by min(decay, (1+s)/(10+s)), s = n - update_after_step - 1
    (0 while s <= 0: a copy), averaging the weights of every update_every-th step."""
    average = None
    for n, step in enumerate(range(cfg["update_every"], max(snapshots) + 1, cfg["update_every"]), start=1):
        s = n - cfg["update_after_step"] - 1
        d = 0.0 if s <= 0 else min(cfg["decay"], (1 + s) / (10 + s))
        w = [t.double() for t in snapshots[step]]
        average = w if average is None else [d * a + (1 - d) * x for a, x in zip(average, w)]
    return average


@pytest.fixture(scope="module")
def runs(tiny_sd15, tmp_path_factory, one_torch_thread):
    """A: LoRA with EMA, validated with both weights at steps 5 and 10, a checkpoint at 5; B: the same without EMA."""
    tmp = tmp_path_factory.mktemp("ema")
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        a = train_quietly(_recipe(tiny_sd15, tmp / "a"))
    b = train_quietly(_recipe(tiny_sd15, tmp / "b", ema=None))
    return a, b, rec


def _peft_names(result) -> list[str]:
    """The trained LoRA parameters' names, in the order of the method's group (Ema.params)."""
    return [n for n, p in result.components.denoiser.named_parameters() if p.requires_grad]


def test_the_average_is_diffusers_rule_over_the_trained_weights(runs):
    a, _, rec = runs
    assert sorted(rec.snapshots) == list(range(1, STEPS + 1))
    (ema,) = rec.emas
    assert ema.model.optimization_step == STEPS // EMA["update_every"]
    expected = hand_ema(rec.snapshots, EMA)
    for shadow, want in zip(ema.model.shadow_params, expected, strict=True):
        torch.testing.assert_close(shadow.double(), want, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(s, p) for s, p in zip(ema.model.shadow_params, rec.snapshots[STEPS]))
    # ema/ holds the average, the run folder the trained weights (LoRA B starts at 0: the A/B pairs moved).
    averaged = load_file(a.run_dir / "ema" / "pytorch_lora_weights.safetensors")
    trained = load_file(a.run_dir / "pytorch_lora_weights.safetensors")
    keys = ["unet." + n.replace(".default", "") for n in _peft_names(a)]
    assert sorted(keys) == sorted(averaged) == sorted(trained)
    for key, shadow, raw in zip(keys, ema.model.shadow_params, rec.snapshots[STEPS], strict=True):
        assert torch.equal(averaged[key], shadow) and torch.equal(trained[key], raw)
    assert any(not torch.equal(averaged[k], trained[k]) for k in keys)


def test_ema_files_exist_in_every_format_load_in_diffusers_and_change_the_image(runs, tiny_sd15):
    from diffusers import StableDiffusionPipeline

    a, _, _ = runs
    written = sorted(f.name for f in a.files)
    assert written == ["pytorch_lora_weights.safetensors", "run.safetensors"]
    assert sorted(p.name for p in (a.run_dir / "ema").iterdir()) == written
    step = ckpt.completed(a.run_dir / "checkpoints")[-1]
    assert sorted(p.name for p in (step / "ema").iterdir()) == written
    assert ckpt.verify(step) is None
    manifest = (step / ckpt.MANIFEST).read_text()
    assert all(name in manifest for name in ("ema/run.safetensors", ema_module.STATE, ema_module.COUNTERS))
    assert "`ema/` — the same files with the exponential moving average" in (a.run_dir / "README.md").read_text()

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15))
    pipe.set_progress_bar_config(disable=True)

    def image(folder, weight_name):
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
        out = pipe(PROMPT, num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(0),
                   output_type="np").images[0]
        return torch.from_numpy(out)

    for name in written:  # the diffusers file and the kohya one, each through load_lora_weights
        raw, averaged = image(a.run_dir, name), image(a.run_dir / "ema", name)
        assert (raw - averaged).abs().max() > 1e-3, name


def test_validation_samples_with_the_average_and_training_is_untouched(runs):
    from PIL import Image

    a, b, _ = runs
    # Swapping the average in and out for samples and files left every trained weight as without EMA.
    for name in ("pytorch_lora_weights.safetensors", "run.safetensors"):
        x, y = load_file(a.run_dir / name), load_file(b.run_dir / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a.losses == b.losses
    assert not (b.run_dir / "ema").exists()
    for step in ("step-000005", "step-000010"):
        folder = a.run_dir / "samples" / step
        (raw,) = sorted(folder.glob("*.png"))
        (averaged,) = sorted((folder / "ema").glob("*.png"))
        same_as_b = b.run_dir / "samples" / step / raw.name
        assert Image.open(raw).tobytes() == Image.open(same_as_b).tobytes()
        assert Image.open(averaged).tobytes() != Image.open(raw).tobytes()
        assert "EMA weights" in (folder / "ema" / "manifest.jsonl").read_text()
    assert a.samples == sorted(a.run_dir.glob("samples/step-*/*.png"))  # the raw ones are measured and shown


def test_a_resumed_run_ends_with_the_average_of_an_uninterrupted_one(runs, tiny_sd15, monkeypatch):
    a, _, rec = runs
    run = a.run_dir.parent / "resumed"
    shutil.copytree(a.run_dir, run)
    for p in [run / "README.md", *run.glob("*.safetensors")]:
        p.unlink()
    shutil.rmtree(run / "ema")
    again = Recorder(monkeypatch)
    r = _recipe(tiny_sd15, a.run_dir.parent.parent, output__run_name="resumed")
    from finetune.recipe import validate

    train(validate(r, "test"), log=lambda *_: None, progress=False, resume=str(run / "checkpoints" / "step-000005"))
    (resumed,) = again.emas
    assert sorted(again.snapshots) == list(range(SAVE_AT + 1, STEPS + 1))
    assert all(torch.equal(x, y) for x, y in zip(resumed.model.shadow_params, rec.emas[0].model.shadow_params, strict=True))
    assert resumed.model.optimization_step == rec.emas[0].model.optimization_step
    for name, again_name in [("pytorch_lora_weights.safetensors",) * 2, ("run.safetensors", "resumed.safetensors")]:
        x, y = load_file(a.run_dir / "ema" / name), load_file(run / "ema" / again_name)  # kohya's: named for the run
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("method", ["textual_inversion", "dreambooth"])
def test_every_method_writes_its_own_files_again_averaged(method, tiny_sd15, tmp_path, one_torch_thread):
    section = {"textual_inversion": {"type": "textual_inversion", "placeholder_token": "<sks>",
                                     "initializer_token": "x", "caption": "a photo of <sks>"},
               "dreambooth": {"type": "dreambooth"}}[method]
    r = _recipe(tiny_sd15, tmp_path, ema={"decay": 0.5}, training__max_steps=3, output__save_every_n_steps=None)
    r["method"], r["validation"]["prompts"] = section, []
    result = train_quietly(r)
    names = sorted(f.name for f in result.files)
    assert sorted(p.name for p in (result.run_dir / "ema").iterdir()) == names
    for f in result.files:
        if f.is_file():
            x, y = load_file(f), load_file(result.run_dir / "ema" / f.name)
            assert x.keys() == y.keys() and any(not torch.equal(x[k], y[k]) for k in x), f.name
    from diffusers import StableDiffusionPipeline

    if method == "dreambooth":  # the averaged model is a whole diffusers folder
        raw = StableDiffusionPipeline.from_pretrained(str(result.run_dir / "model")).unet
        averaged = StableDiffusionPipeline.from_pretrained(str(result.run_dir / "ema" / "model")).unet
        assert any(not torch.equal(p, q) for p, q in zip(raw.parameters(), averaged.parameters()))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15))
        pipe.load_textual_inversion(str(result.run_dir / "ema"))
        assert "<sks>" in pipe.tokenizer.get_vocab()


@pytest.mark.parametrize("device", ["accelerator", "cpu"])
def test_the_plan_counts_the_average_the_run_keeps(runs, tmp_path, device):
    """`finetune plan` of this run's own recipe: its EMA row is the bytes of EMAModel's shadow parameters."""
    import yaml

    from finetune.plan.run import plan

    a, _, rec = runs
    recipe = yaml.safe_load((a.run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["training"]["ema"]["device"] = device
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    est = plan(str(tmp_path / "run.yaml"), []).estimate
    shadow = sum(s.numel() * s.element_size() for s in rec.emas[0].model.shadow_params)
    (row,) = [r for r in est.rows if r.label.startswith("EMA of the trained weights")]
    assert row.bytes == shadow and row.phase == {"accelerator": "training", "cpu": "EMA update"}[device]
    assert est.ema_host == (shadow if device == "cpu" else 0)
