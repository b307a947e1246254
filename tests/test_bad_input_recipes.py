"""Bad recipes get one clear line, at once, and leave nothing behind: numbers out of range or not
finite, YAML aliases that expand without end, what `finetune train` can know before loading a
model (the VAE path, the output folder, the family against the model folder, LoRA target modules
against the denoiser), the quickstart started from another folder, and library warnings about an
image re-issued naming the image."""

from __future__ import annotations

import os
import shutil
import time
import warnings

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import _quiet_libraries, app
from finetune.data.images import ImageWarning, image_size, load_image, warnings_named
from finetune.data.sources import resolve_data_path
from finetune.errors import RecipeError
from finetune.recipe import validate
from finetune.recipe.loader import REPO_RECIPES
from finetune.train import train
from finetune.train.preflight import _not_writable

from .helpers import make_image_folder, tiny_recipe

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error(result, *fragments) -> str:
    """The command failed with exit 1 and exactly one short `error:` line holding `fragments`,
    without a traceback and before any model loaded."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 1, result.output
    assert len(errors) == 1, result.output
    assert len(errors[0]) < 300, errors[0]
    assert all(f in errors[0] for f in fragments), errors[0]
    assert "Traceback" not in result.output
    assert not any(line.startswith("loading ") for line in lines), result.output
    return errors[0]


def no_run_folder(out) -> bool:
    return not out.exists() or not any(out.iterdir())


@pytest.fixture
def recipe_file(tmp_path, tiny_sd15):
    data = make_image_folder(tmp_path / "data", n=2, sizes=((64, 64),))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_sd15, data, tmp_path / "out")))
    return path


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("override, key, words", [
    ("data.resolution=1048576", "data.resolution", "less than or equal to 4096"),  # was a MemoryError
    ("data.resolution=32", "data.resolution", "greater than or equal to 64"),
    ("data.repeats=100000000", "data.repeats", "less than or equal to"),
    ("data.path=''", "data.path", "at least 1 character"),
    ("training.max_steps=0", "training.max_steps", "greater than or equal to 1"),
    ("training.max_steps=100000000000", "training.max_steps", "less than or equal to 10000000"),
    ("training.epochs=100000000", "training.epochs", "less than or equal to"),
    ("training.batch_size=1000000", "training.batch_size", "less than or equal to 4096"),
    ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps", "greater than or equal to 1"),
    ("training.learning_rate=.inf", "training.learning_rate", "finite number (got inf)"),
    ("training.learning_rate=.nan", "training.learning_rate", "finite number (got nan)"),
    ("training.learning_rate=-0.001", "training.learning_rate", "greater than 0"),
    ("training.learning_rate=1000", "training.learning_rate", "less than or equal to 10"),
    ("training.seed=-1", "training.seed", "greater than or equal to 0"),
    ("training.seed=4294967296", "training.seed", "less than or equal to 4294967295"),  # numpy's range
    ("training.noise_offset=.inf", "training.noise_offset", "finite"),
    ("training.max_grad_norm=.nan", "training.max_grad_norm", "finite"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas.1", "less than 1"),
    ("optimizer.eps=0", "optimizer.eps", "greater than 0"),
    ("method.rank=100000", "method.rank", "less than or equal to 1024"),
    ("method.alpha=.inf", "method.alpha", "finite"),
    ("method.text_encoder_lr=.nan", "method.text_encoder_lr", "finite"),
    ("method.target_modules=[]", "method.target_modules", "at least 1 item"),
    ("model.flux.mode_scale=5", "model.flux.mode_scale", "less than or equal to 1.75"),
    ("model.flux.timestep_shift=.inf", "model.flux.timestep_shift", "finite"),
    ("validation.width=100000", "validation.width", "less than or equal to 4096"),
    ("validation.num_inference_steps=100000000", "validation.num_inference_steps", "less than or equal to 1000"),
    ("prior_preservation.prior_loss_weight=.nan", "prior_preservation.prior_loss_weight", "finite"),
    ("output.formats=[]", "output.formats", "at least 1 item"),
])
def test_numbers_are_bounded_and_finite(recipe_file, override, key, words):
    one_error(invoke("validate", recipe_file, override), f"error: {recipe_file}: {key}: ", words)


def test_data_path_must_be_a_folder_or_a_metadata_file(recipe_file, tmp_path):
    image = tmp_path / "data" / "img0.png"
    one_error(invoke("validate", recipe_file, f"data.path={image}"), "data.path: ", "is a file; expected a folder")


# ---------------------------------------------------------------- YAML aliases


def _laughs(path, levels: int, where: str = "data.resolution") -> None:
    """A 'billion laughs' recipe: each level is nine aliases of the one before (9**levels values)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    section, key = where.split(".")
    lines.append(f"{section}: {{path: ., {key}: *l{levels - 1}}}" if section == "data" else
                 f"data: {{path: .}}\n{section}: {{{key}: *l{levels - 1}}}")
    path.write_text("\n".join(lines) + "\n")


def test_nine_levels_of_aliases_answer_at_once_in_one_line(tmp_path):
    invoke("validate", tmp_path / "missing.yaml")  # imports and schema building out of the timing
    laughs = tmp_path / "laughs.yaml"
    _laughs(laughs, 9)
    assert laughs.stat().st_size < 600
    start = time.perf_counter()
    result = invoke("validate", laughs)
    took = time.perf_counter() - start
    one_error(result, f"error: {laughs}: ", "YAML aliases", "more than 100,000 values")
    assert took < 0.5, f"{took:.2f} s"


@pytest.mark.parametrize("where", ["validation.prompts", "output.hooks", "description.x"])
def test_alias_bombs_anywhere_are_refused(tmp_path, where):
    laughs = tmp_path / "laughs.yaml"
    _laughs(laughs, 7, where)
    one_error(invoke("validate", laughs), "YAML aliases")


def test_small_alias_values_print_only_an_excerpt(tmp_path):
    # Under the bound, but the wrong type: the error shows a short excerpt, not 6,561 strings.
    laughs = tmp_path / "laughs.yaml"
    _laughs(laughs, 4)
    result = invoke("validate", laughs)
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if "data.resolution" in line)
    assert "expected a valid integer" in line and "..." in line and len(line) < 300


def test_alias_to_itself_nesting_and_huge_numbers(tmp_path):
    cases = {"self.yaml": ("data: &a {path: [*a]}\n", "refers to itself"),
             "deep.yaml": ("data: {path: ., resolution: " + "[" * 3000 + "]" * 3000 + "}\n", "nested"),
             "digits.yaml": ("data: {path: ., resolution: " + "9" * 5000 + "}\n", "cannot be read"),
             "date.yaml": ("data: {path: .}\ndescription: 2024-13-45\n", "month must be in 1..12"),
             "long.yaml": ("data: {path: .}\nmodel: {family: " + "x" * 100_000 + "}\n", "unknown family")}
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        one_error(invoke("validate", tmp_path / name), words)


# ---------------------------------------------------------------- known before loading


def test_vae_path_missing_or_not_a_vae(recipe_file, tmp_path):
    out = tmp_path / "out"
    one_error(invoke("train", recipe_file, "model.vae=/no/such/vae"),
              "model.vae: cannot load /no/such/vae: it does not exist")
    (tmp_path / "empty").mkdir()
    one_error(invoke("train", recipe_file, f"model.vae={tmp_path / 'empty'}"),
              "model.vae: cannot load ", "not a diffusers VAE")
    assert no_run_folder(out)


def test_output_dir_a_file(recipe_file, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    one_error(invoke("train", recipe_file, f"output.dir={a_file}"), f"output.dir: {a_file} is a file")
    one_error(invoke("train", recipe_file, f"output.dir={a_file / 'runs'}"),
              f"output.dir: {a_file} is a file, so {a_file / 'runs'} cannot be made in it")
    assert a_file.read_text() == "not a folder"


def test_output_dir_read_only(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        why = _not_writable(str(locked / "runs"))
        if os.geteuid() == 0:
            # Root writes through permission bits; the check asks the kernel (os.access), so it
            # refuses only what would really fail (a read-only file system), not this folder.
            assert why is None
            (locked / "probe").write_text("root can")
        else:
            assert why == f"{locked} is not writable by this account; choose a folder you can write in"
    finally:
        locked.chmod(0o755)


def test_target_module_typo_named_with_a_suggestion(recipe_file, tmp_path):
    line = one_error(invoke("train", recipe_file, "method.target_modules=[to_q,to_qq]"),
                     "method.target_modules: 'to_qq' names no module of the unet; did you mean 'to_q'")
    assert "'to_q' names" not in line
    one_error(invoke("train", recipe_file, "method.target_modules=[down_blocks]"),
              "method.target_modules: 'down_blocks' names only ModuleList modules, which LoRA cannot wrap")
    one_error(invoke("train", recipe_file, "method.train_text_encoder=true",
                     "method.text_encoder_target_modules=[q_projj]"),
              "method.text_encoder_target_modules: 'q_projj' names no module of the text_encoder; "
              "did you mean 'q_proj'")
    assert no_run_folder(tmp_path / "out")


def test_infinite_learning_rate(recipe_file, tmp_path, tiny_sd15):
    one_error(invoke("train", recipe_file, "training.learning_rate=.inf"), "training.learning_rate: ", "finite")
    # A recipe changed in Python after validation skips the schema; preflight still refuses it.
    recipe = validate(tiny_recipe(tiny_sd15, tmp_path / "data", tmp_path / "out"), "test")
    recipe.training.learning_rate = float("inf")
    recipe.method.text_encoder_lr = float("nan")
    with pytest.raises(RecipeError) as err:
        train(recipe, log=lambda *_: None, progress=False)
    assert err.value.problems == ["method.text_encoder_lr: nan is not a finite number",
                                  "training.learning_rate: inf is not a finite number"]
    assert no_run_folder(tmp_path / "out")


def test_family_that_does_not_fit_the_model_folder(recipe_file, tmp_path):
    # Was: AttributeError: 'NoneType' object has no attribute 'to', after loading the model.
    one_error(invoke("train", recipe_file, "model.family=sdxl"),
              "model.family: sdxl does not fit ", "a StableDiffusionPipeline (sd1); set model.family=sd1 or auto")
    one_error(invoke("train", recipe_file, "model.base=builtin:tiny-sdxl", "model.family=sd1"),
              "model.family: sd1 does not fit builtin:tiny-sdxl, a StableDiffusionXLPipeline (sdxl)")
    one_error(invoke("train", recipe_file, "model.base=builtin:tiny-sdxl", "method.target_modules=[to_kk]"),
              "method.target_modules: 'to_kk' names no module of the unet; did you mean 'to_k'")
    assert no_run_folder(tmp_path / "out")


def test_model_folder_missing_a_part(recipe_file, tmp_path, tiny_sd15):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15, broken, ignore=shutil.ignore_patterns("unet"))
    one_error(invoke("train", recipe_file, f"model.base={broken}"),
              f"model.base: {broken} has no unet/ folder, which its model_index.json lists")
    (broken / "model_index.json").write_text("{")
    one_error(invoke("train", recipe_file, f"model.base={broken}"), "model_index.json is not a JSON object")
    assert no_run_folder(tmp_path / "out")


# ---------------------------------------------------------------- quickstart from anywhere


def test_quickstart_finds_its_sample_data_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("datasets/robot", REPO_RECIPES) == REPO_RECIPES.parent / "datasets" / "robot"
    result = invoke("train", "quickstart", "training.max_steps=1", "validation.prompts=[]", "optimizer.type=adamw",
                    "output.save_every_n_steps=null", f"output.dir={tmp_path / 'out'}", "output.run_name=q",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    assert "8 images x 1 repeats from datasets/robot" in result.output
    assert (tmp_path / "out" / "q" / "pytorch_lora_weights.safetensors").is_file()


def test_a_relative_data_path_found_nowhere_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"extends": "quickstart", "data": {"path": "./my-photos"}}))
    one_error(invoke("validate", recipe), f"data.path: ./my-photos does not exist here (nor in {recipe.parent})")


# ---------------------------------------------------------------- library warnings


def _bad_exif_jpeg(path):
    """A JPEG whose EXIF block claims more data than it holds: PIL warns without naming the file."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 200  # ImageDescription
    Image.new("RGB", (64, 64), (200, 100, 50)).save(path, exif=exif.tobytes()[:-150])
    return path


def _pil_says(path) -> str:
    """What Pillow itself warns about the file, first line (its wording differs between releases)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(path) as im:
            im.getexif()
            im.load()
    return str(caught[0].message).splitlines()[0]


def test_pil_warning_reissued_naming_the_image(tmp_path):
    path = _bad_exif_jpeg(tmp_path / "bad exif.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(path).size == (64, 64)
        assert image_size(path) == (64, 64)  # the same warning again: said once per file
    assert [(w.category, str(w.message)) for w in caught] == [
        (ImageWarning, f"image {path}: {_pil_says(path)}")]


def test_numpy_warning_reissued_naming_the_image():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with warnings_named("scan.tif"):
            warnings.warn("overflow encountered in cast\n  (numpy detail)", RuntimeWarning)
    assert [str(w.message) for w in caught] == ["image scan.tif: overflow encountered in cast (numpy detail)"]


def test_cli_shows_a_warning_as_one_line(tmp_path, capsys):
    path = _bad_exif_jpeg(tmp_path / "photo.jpg")
    _quiet_libraries(models=False)  # what every command does first; pytest restores showwarning after
    load_image(path)
    assert capsys.readouterr().err == f"warning: image {path}: {_pil_says(path)}\n"


def test_dataset_check_names_the_image_a_library_warns_about(tmp_path):
    """The check reads images in worker threads, where a process-wide catch cannot tell files apart."""
    from finetune.data import check_dataset
    from finetune.recipe.schema import DataConfig

    folder = tmp_path / "set"
    make_image_folder(folder, n=6)
    bad = _bad_exif_jpeg(folder / "odd exif.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_dataset(DataConfig(path=str(folder), resolution=64, instance_prompt="a photo"))
    named = [str(w.message) for w in caught if w.category is ImageWarning]
    assert named == [f"image {bad.name}: {_pil_says(bad)}"]
