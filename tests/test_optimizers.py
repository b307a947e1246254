"""Prodigy, schedule-free AdamW and Adafactor (optimizer.type): each trains the tiny SD1.5 LoRA, and
a run resumed from its halfway checkpoint ends with bit-identical weights; schedule-free AdamW samples
and saves its averaged weights while it trains on, and a resume continues from the trained ones; the
schedules they cannot take are refused with the key, before any model loads."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.recipe import validate
from finetune.train import checkpoint as ckpt
from finetune.train import train

from .helpers import loss_before_and_after, make_image_folder, step_rows, tiny_recipe

STEPS, HALF = 16, 8
# optimizer section, learning rate, training overrides: each optimizer's typical use.
RUNS = {
    "prodigy": ({"type": "prodigy", "d_coef": 2.0}, 1.0, {}),
    "adamw_schedulefree": ({"type": "adamw_schedulefree"}, 5e-3, {"lr_warmup_steps": 2}),
    "adafactor": ({"type": "adafactor"}, 5e-3, {"lr_scheduler": "cosine", "lr_warmup_steps": 2}),
    "adafactor_relative_step": ({"type": "adafactor", "relative_step": True, "warmup_init": False}, 1e-4, {}),
}


def _recipe(tiny_sd15, data, out, name: str) -> dict:
    optimizer, lr, training = RUNS[name]
    r = tiny_recipe(tiny_sd15, data, out, training__max_steps=STEPS, training__batch_size=4,
                    training__learning_rate=lr)
    r["optimizer"] = dict(optimizer)
    r["training"].update(training)
    r["validation"].update(prompts=["a photo of sks ball"], every_n_steps=HALF)  # schedule-free: eval mode
    r["output"].update(run_name=name, save_every_n_steps=HALF, formats=["diffusers"])
    return r


@pytest.fixture(scope="module")
def runs(tiny_sd15, tmp_path_factory, one_torch_thread):
    """name -> (a run of STEPS steps, the same run resumed from its step-HALF checkpoint); made once each."""
    made = {}

    def get(name: str):
        if name not in made:
            tmp = tmp_path_factory.mktemp(name)
            data = make_image_folder(tmp / "data", n=4, sizes=((64, 64),))
            recipe = validate(_recipe(tiny_sd15, data, tmp / "out", name), "test")
            straight = train(recipe, log=lambda *_: None, progress=False)
            # Its first half again: the folder as it was at step HALF (no final files, no card).
            copy = tmp / "out" / "resumed"
            shutil.copytree(straight.run_dir, copy, ignore=shutil.ignore_patterns("README.md"))
            resumed = train(recipe, log=lambda *_: None, progress=False,
                            resume=str(copy / "checkpoints" / f"step-{HALF:06d}"))
            made[name] = (straight, resumed, data)
        return made[name]

    return get


@pytest.mark.parametrize("name", RUNS)
def test_trains_the_lora_and_resumes_exactly(runs, tiny_sd15, name):
    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.recipe.schema import ModelConfig

    straight, resumed, data = runs(name)
    family = get_family("sd1")
    c = family.load(resolve_source(str(tiny_sd15)), ModelConfig(base=str(tiny_sd15)))
    before, after = loss_before_and_after(family, c, data, straight.run_dir)
    assert after < 0.92 * before, (before, after)
    a = load_file(straight.run_dir / "pytorch_lora_weights.safetensors")
    b = load_file(resumed.run_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended with other weights"
    assert [r["loss"] for r in step_rows(resumed.run_dir)] == [r["loss"] for r in step_rows(straight.run_dir)]
    assert [r["lr"] for r in step_rows(resumed.run_dir)] == [r["lr"] for r in step_rows(straight.run_dir)]


def _saved_optimizer(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{HALF:06d}" / ckpt.STATE / "optimizer.bin", weights_only=True)


def test_optimizer_state_is_saved_with_its_own_counters(runs):
    prodigy = _saved_optimizer(runs("prodigy")[0].run_dir)
    group = prodigy["param_groups"][0]
    assert group["k"] == HALF and group["d"] > group["d0"]  # the step size it estimated, not its start
    assert all({"exp_avg", "exp_avg_sq", "s", "p0"} <= s.keys() for s in prodigy["state"].values())
    sf = _saved_optimizer(runs("adamw_schedulefree")[0].run_dir)
    group = sf["param_groups"][0]
    assert group["train_mode"] is True and group["k"] == HALF and group["warmup_steps"] == 2
    assert group["weight_sum"] > 0 and all({"z", "exp_avg_sq"} <= s.keys() for s in sf["state"].values())
    relative = _saved_optimizer(runs("adafactor_relative_step")[0].run_dir)
    assert relative["param_groups"][0]["relative_step"] and all(s["step"] == HALF for s in relative["state"].values())
    # The logged rate is the one Adafactor computes (AdafactorSchedule reports it).
    rates = [r["lr"] for r in step_rows(runs("adafactor_relative_step")[0].run_dir)]
    assert set(rates) == {0.01}  # min(1e-2, 1/sqrt(step)), not training.learning_rate


def test_prodigy_logs_the_step_size_it_estimates(runs):
    """Its logged lr is the scheduled 1.0; each row also has the estimate d (the one its checkpoint
    saves) and the rate it steps by, d x lr."""
    rows = step_rows(runs("prodigy")[0].run_dir)
    assert {r["lr"] for r in rows} == {1.0}
    assert all(r["effective_lr"] == r["prodigy_d"] * r["lr"] for r in rows)
    assert rows[-1]["prodigy_d"] > rows[0]["prodigy_d"]  # it grows from d0 as it learns the scale
    assert rows[HALF - 1]["prodigy_d"] == _saved_optimizer(runs("prodigy")[0].run_dir)["param_groups"][0]["d"]
    assert not any("prodigy_d" in r for r in step_rows(runs("adafactor")[0].run_dir))


def test_schedule_free_saves_its_average_and_trains_on_from_the_trained_weights(runs):
    """A checkpoint's state/ holds the train-mode weights y and the optimizer's z; its adapter file holds
    the average x = y + (1 - 1/beta1) (z - y), as the final files do; the bit-exact resume above started
    from that state/, so the run trained on from y."""
    straight, _, _ = runs("adamw_schedulefree")
    folder = straight.run_dir / "checkpoints" / f"step-{HALF:06d}"
    model = load_file(folder / ckpt.STATE / ckpt.PARAMS.format(0))  # the trained parameters, by name
    unet = straight.components.denoiser
    trained = [n for n, p in unet.named_parameters() if p.requires_grad]  # the optimizer's order
    state = _saved_optimizer(straight.run_dir)["state"]
    beta1 = 0.9
    saved = load_file(folder / "pytorch_lora_weights.safetensors")
    assert len(trained) == len(saved) == len(state)
    for i, key in enumerate(trained):
        y, z = model[key], state[i]["z"]
        x = y.lerp(z, 1 - 1 / beta1)
        file_key = "unet." + key.replace(".default", "")
        assert torch.allclose(saved[file_key], x, rtol=0, atol=1e-7), key
        assert not torch.equal(saved[file_key], y) or torch.equal(y, z)
    assert any(not torch.equal(model[k], state[i]["z"]) for i, k in enumerate(trained))
    # At the end the run stays on the average: the in-memory weights are the final file's.
    optimizer = straight.optimizer
    assert optimizer.param_groups[0]["train_mode"] is False
    final = load_file(straight.run_dir / "pytorch_lora_weights.safetensors")
    for name, p in unet.named_parameters():
        if "lora_" in name:
            assert torch.equal(final["unet." + name.replace(".default", "")], p.detach()), name


runner = CliRunner()


@pytest.fixture(scope="module")
def recipe_file(tiny_sd15, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rules")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_sd15, make_image_folder(tmp / "data", n=1), tmp / "out")))
    return path


@pytest.mark.parametrize("overrides, key, words", [
    (["optimizer.type=prodigy", "training.learning_rate=1", "training.lr_scheduler=cosine"],
     "training.lr_scheduler", "Prodigy sets its own step size; use constant (got cosine)"),
    (["optimizer.type=prodigy", "training.learning_rate=1e-4"], "training.learning_rate", "use 1.0"),
    (["optimizer.type=prodigy", "training.learning_rate=1", "training.lr_warmup_steps=10"],
     "training.lr_warmup_steps", "use 0"),
    (["optimizer.type=prodigy", "training.learning_rate=1", "method.text_encoder_lr=0.5"],
     "method.text_encoder_lr", "one rate for every parameter group"),
    (["optimizer.type=adamw_schedulefree", "training.lr_scheduler=cosine"], "training.lr_scheduler",
     "schedule-free AdamW needs no schedule"),
    (["optimizer.type=adafactor", "optimizer.relative_step=true", "training.lr_scheduler=linear"],
     "training.lr_scheduler", "Adafactor with optimizer.relative_step follows its own schedule"),
    (["optimizer.type=adafactor", "optimizer.relative_step=true", "training.lr_warmup_steps=5"],
     "training.lr_warmup_steps", "optimizer.warmup_init"),
    (["optimizer.type=adafactor", "optimizer.warmup_init=true"], "optimizer.warmup_init", "relative_step: true"),
    (["optimizer.type=adamw", "optimizer.d_coef=2"], "optimizer.d_coef", "an option of optimizer.type prodigy"),
])
def test_schedules_they_cannot_take_are_refused_naming_the_key(recipe_file, overrides, key, words):
    result = runner.invoke(app, ["validate", str(recipe_file), *overrides], catch_exceptions=False)
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert errors[0].startswith(f"error: {recipe_file}: {key}: ") and words in errors[0], errors[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("overrides", [
    ["optimizer.type=adamw_schedulefree", "training.lr_warmup_steps=100"],  # its own warm-up
    ["optimizer.type=adafactor", "training.lr_scheduler=constant_with_warmup", "training.lr_warmup_steps=100"],
    ["optimizer.type=prodigy", "training.learning_rate=1", "optimizer.use_bias_correction=true",
     "optimizer.safeguard_warmup=true"],
])
def test_their_usual_settings_validate(recipe_file, overrides):
    result = runner.invoke(app, ["validate", str(recipe_file), *overrides], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.strip().endswith(": ok"), result.output


@pytest.mark.parametrize("kind, package", [("prodigy", "prodigyopt"), ("adamw_schedulefree", "schedulefree")])
def test_a_missing_package_is_named_with_its_pip_command(monkeypatch, kind, package):
    from finetune.recipe.schema import OptimizerConfig
    from finetune.train.optim import build_optimizer

    monkeypatch.setitem(sys.modules, package, None)  # import fails as when it is not installed
    with pytest.raises(FinetuneError, match=f"optimizer.type={kind} needs the {package} package .*`pip install {package}`"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], OptimizerConfig(type=kind), 1.0)
