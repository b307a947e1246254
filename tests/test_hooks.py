"""The output pipeline: hooks run in order on every emitted image, blocked prompts write nothing
but are in the manifest, provenance is readable with PIL and names the adapter hash, and a
third-party hook is found through its entry point."""

import hashlib
import json
import sys
import textwrap

import pytest
from PIL import Image
from typer.testing import CliRunner

import finetune.hooks as hooks_mod
from finetune.cli import app
from finetune.errors import RecipeError
from finetune.recipe import validate

from .helpers import make_image_folder, tiny_recipe

runner = CliRunner()


def gen(tiny_sd15, out, *extra, prompts=("a photo of sks ball",)):
    args = ["generate", "--base", tiny_sd15, "--steps", "2", "--width", "64", "--height", "64", "--out", out]
    for p in prompts:
        args += ["--prompt", p]
    r = runner.invoke(app, [str(a) for a in [*args, *extra]], catch_exceptions=False)
    return r


def manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tiny_sd15, tmp_path_factory):
    from finetune.train import train

    tmp = tmp_path_factory.mktemp("lora")
    r = tiny_recipe(tiny_sd15, make_image_folder(tmp / "data", n=2), tmp / "out", training__max_steps=2)
    return train(validate(r, "test"), log=lambda *_: None, progress=False)


def test_provenance_metadata_names_the_adapter_hash(tiny_sd15, lora_run, tmp_path):
    kohya = lora_run.run_dir / "run.safetensors"
    r = gen(tiny_sd15, tmp_path / "g", "--lora", kohya, "--seed", "7")
    assert r.exit_code == 0, r.output
    (path,) = sorted((tmp_path / "g").glob("*.png"))
    text = Image.open(path).text
    digest = hashlib.sha256(kohya.read_bytes()).hexdigest()
    assert text["parameters"].startswith("a photo of sks ball\n")
    assert "Seed: 7" in text["parameters"] and "Size: 64x64" in text["parameters"]
    assert f"run.safetensors: {digest[:12]}" in text["parameters"]
    record = json.loads(text["finetune"])
    assert record["adapters"][0]["sha256"] == digest and record["base_model"] == str(tiny_sd15)
    rows = manifest(tmp_path / "g")
    assert rows[0]["file"] == path.name and rows[0]["status"] == "written"
    # No hooks named: the defaults watermark the image, write its provenance, then sign the file.
    assert [v["hook"] for v in rows[0]["verdicts"]] == ["watermark", "provenance", "c2pa"]
    assert rows[0]["verdicts"][0]["watermarked"] and json.loads(text["finetune_watermark"])["watermarked"]


def test_blocked_prompt_writes_no_image_and_is_in_the_manifest(tiny_sd15, tmp_path):
    r = gen(tiny_sd15, tmp_path / "g", "--hook", "{type: prompt_filter, block: [forbidden thing]}", "--hook", "provenance",
            prompts=("a cat", "a Forbidden-Thing, in oil", "a dog"))
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "g").glob("*.png"))
    assert len(files) == 2 and not any("forbidden" in f for f in files)
    blocked = [row for row in manifest(tmp_path / "g") if row["status"] == "blocked"]
    assert len(blocked) == 1 and blocked[0]["file"] is None
    assert "blocked term 'forbidden thing'" in blocked[0]["reason"]


def test_no_hooks_is_explicit_and_bad_hooks_fail_before_loading(tiny_sd15, tmp_path):
    r = gen(tiny_sd15, tmp_path / "g", "--no-hooks")
    assert r.exit_code == 0 and "all turned off" in r.output
    (path,) = (tmp_path / "g").glob("*.png")
    assert "parameters" not in Image.open(path).text
    r = gen(tiny_sd15, tmp_path / "h", "--hook", "{type: nope}")
    assert r.exit_code == 1 and "unknown hook 'nope'" in r.output and not (tmp_path / "h").exists()
    with pytest.raises(RecipeError, match=r"output\.hooks\.0\.type: unknown hook 'nope'"):
        validate({"data": {"path": "x"}, "output": {"hooks": [{"type": "nope"}]}}, "r.yaml")


PLUGIN = textwrap.dedent('''
    from typing import Literal
    from finetune.hooks.base import Hook, HookConfig, Verdict

    class StampConfig(HookConfig):
        type: Literal["stamp"] = "stamp"
        label: str = "x"

    class Stamp(Hook):
        name = "stamp"
        Config = StampConfig

        def process(self, item):
            order = item.text.get("order", "")
            item.text["order"] = order + self.cfg.label
            # Proves ordering: the provenance text exists only if provenance ran first.
            item.text["saw_provenance_" + self.cfg.label] = str("parameters" in item.text)
            item.verdicts.append(Verdict(self.name, "metadata", self.cfg.label))
            return item
''')


@pytest.fixture
def stamp_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "stamp_plugin").mkdir(parents=True)
    (site / "stamp_plugin" / "__init__.py").write_text(PLUGIN)
    dist = site / "stamp_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stamp-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[finetune.hooks]\nstamp = stamp_plugin:Stamp\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(hooks_mod, "_entry_points_loaded", False)
    yield
    hooks_mod.HOOKS._items.pop("stamp", None)
    sys.modules.pop("stamp_plugin", None)


def test_entry_point_hook_is_discovered_and_hooks_run_in_order(stamp_plugin, tiny_sd15, tmp_path):
    assert "stamp" in hooks_mod.hook_names()
    r = gen(tiny_sd15, tmp_path / "g", "--hook", "{type: stamp, label: A}", "--hook", "provenance",
            "--hook", "{type: stamp, label: B}")
    assert r.exit_code == 0, r.output
    (path,) = (tmp_path / "g").glob("*.png")
    text = Image.open(path).text
    assert text["order"] == "AB"
    assert text["saw_provenance_A"] == "False" and text["saw_provenance_B"] == "True"
    assert [v["hook"] for v in manifest(tmp_path / "g")[0]["verdicts"]] == ["stamp", "provenance", "stamp"]


def test_validation_samples_pass_through_recipe_hooks(tiny_sd15, tmp_path):
    from finetune.train import train

    r = tiny_recipe(tiny_sd15, make_image_folder(tmp_path / "data", n=2), tmp_path / "out", training__max_steps=1,
                    validation__prompts=["a photo of sks ball", "a blocked word"])
    r["output"]["hooks"] = [{"type": "prompt_filter", "block": ["blocked word"]}, {"type": "provenance"}]
    result = train(validate(r, "test"), log=lambda *_: None, progress=False)
    folder = result.run_dir / "samples" / "step-000001"
    (path,) = folder.glob("*.png")
    assert "validation step 1" in Image.open(path).text["finetune"]
    assert [row["status"] for row in manifest(folder)] == ["written", "blocked"]


def test_prompt_file_rows_adapters_with_weights_and_grid(tiny_sd15, lora_run, tmp_path):
    pf = tmp_path / "prompts.jsonl"
    pf.write_text('{"prompt": "a cat", "seed": 5, "width": 64, "height": 64}\n'
                  '{"prompt": "a dog", "n": 2, "negative_prompt": "blurry"}\n')
    txt = tmp_path / "more.txt"
    txt.write_text("# comment\na house\n")
    r = gen(tiny_sd15, tmp_path / "g", "--prompts", pf, "--lora", f"{lora_run.run_dir / 'run.safetensors'}:0.7",
            "--grid", prompts=())
    assert r.exit_code == 0, r.output
    rows = manifest(tmp_path / "g")
    assert [row["prompt"] for row in rows] == ["a cat", "a dog", "a dog", "grid of 3 images"]
    assert rows[0]["seed"] == 5 and rows[1]["seed"] == 1 and rows[2]["seed"] == 2
    files = sorted(p.name for p in (tmp_path / "g").glob("*.png"))
    assert len(files) == 4 and "grid.png" in files
    assert Image.open(tmp_path / "g" / "grid.png").size == (128, 128)
    assert "parameters" in Image.open(tmp_path / "g" / "grid.png").text  # the grid went through the hooks
    r = gen(tiny_sd15, tmp_path / "t", "--prompts", txt, prompts=())
    assert r.exit_code == 0 and manifest(tmp_path / "t")[0]["prompt"] == "a house"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,size\na cat,64\n")
    r = gen(tiny_sd15, tmp_path / "b", "--prompts", bad, prompts=())
    assert r.exit_code == 1 and "unknown column(s) size" in r.output


def test_watermark_detect_command(tiny_sd15, lora_run, tmp_path):
    r = gen(tiny_sd15, tmp_path / "g", "--lora", lora_run.run_dir, "--hook", "watermark", "--hook", "provenance",
            "--width", "256", "--height", "256")
    assert r.exit_code == 0, r.output
    (made,) = (tmp_path / "g").glob("*.png")
    other = tmp_path / "other.png"
    Image.new("RGB", (256, 256), (90, 120, 200)).save(other)
    outputs = lora_run.run_dir.parent
    r = runner.invoke(app, ["watermark", "detect", str(made), "--outputs", str(outputs)])
    assert r.exit_code == 0 and ": found" in r.output and f"run {lora_run.run_dir.name}" in r.output
    r = runner.invoke(app, ["watermark", "detect", str(made), str(other), "--outputs", str(outputs)])
    assert r.exit_code == 1 and f"{other}: not found" in r.output and "error" not in r.output
