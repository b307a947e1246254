"""The UI's library side without a browser: the recipe form round-trips to the CLI's overrides, the
dataset page's check and caption writes stay inside the roots, the Compare grid, and the whole app
behind its token (Gradio mounted on FastAPI, driven through Starlette's TestClient)."""

import pytest
from starlette.testclient import TestClient

from finetune.errors import FinetuneError
from finetune.recipe import load_recipe
from finetune.ui import datasets, form
from finetune.ui.roots import Roots

from .helpers import draw_subject, make_image_folder


def test_the_form_turns_changed_fields_into_overrides_the_cli_accepts():
    recipe, _ = load_recipe("quickstart")
    fields = form.form_fields()
    keys = [f.key for f in fields]
    assert {"data.path", "training.learning_rate", "validation.prompts", "output.keep_best"} <= set(keys)
    assert all(f.help for f in fields if f.key == "training.mixed_precision")  # the schema's description
    shown = form.values(recipe, fields)
    assert form.overrides(recipe, fields, shown) == []  # nothing changed, nothing overridden
    changed = list(shown)
    changed[keys.index("training.max_steps")] = 20
    changed[keys.index("validation.prompts")] = "a photo of sks robot\n\nsks robot in snow\n"
    changed[keys.index("training.lr_scheduler")] = "linear"
    ov = form.overrides(recipe, fields, changed)
    assert ov == ["training.max_steps=20", "training.lr_scheduler=\"linear\"",
                  'validation.prompts=["a photo of sks robot", "sks robot in snow"]']
    from finetune.errors import RecipeError
    from finetune.ui.pages import _field_problem

    with pytest.raises(RecipeError) as refused:
        load_recipe("quickstart", [*ov, "training.batch_size=0"])
    by_field = {f.key: _field_problem(f, refused.value.problems) for f in fields}
    assert by_field["training.batch_size"] == "⚠ expected greater than or equal to 1 (got 0)"
    assert sum(v is not None for v in by_field.values()) == 1  # shown under its own field only
    again, _ = load_recipe("quickstart", ov)
    assert (again.training.max_steps, again.training.lr_scheduler) == (20, "linear")
    assert again.validation.prompts == ["a photo of sks robot", "sks robot in snow"]


def test_dataset_check_and_captions_inside_the_roots(tmp_path):
    root = tmp_path / "root"
    folder = make_image_folder(root / "set", n=3, sizes=((64, 64),))
    draw_subject(9, (64, 64)).save(folder / "nocaption.png")
    (folder / "broken.png").write_bytes(b"nope")
    roots = Roots([root])
    checked = datasets.check(roots, str(folder), resolution=64)
    found = {(cat, name) for cat, name, _ in checked.findings}
    assert any(name == "broken.png" for _, name in found) and any(name == "nocaption.png" for _, name in found)
    assert checked.usable == 4 and checked.buckets == {"64x64": 4}
    assert all(path.startswith(str(root)) for path, _ in checked.thumbnails)
    assert not any("broken.png" in label for _, label in checked.thumbnails)  # never handed to a browser
    datasets.save_caption(roots, "set", "nocaption.png", "a photo of sks ball  ")
    assert (folder / "nocaption.txt").read_text() == "a photo of sks ball\n"
    assert dict(datasets.captions(roots, "set"))["nocaption.png"] == "a photo of sks ball"
    outside = tmp_path / "outside"
    outside.mkdir()
    for args in (("set", "../outside/x.png", "c"), (str(outside), "x.png", "c"), ("set", "img0.png", "x" * 20_000),
                 ("set", "missing.png", "c")):
        with pytest.raises(FinetuneError):
            datasets.save_caption(roots, *args)
    assert not (outside / "x.txt").exists()
    (folder / "link.png").symlink_to(outside / "secret.png")
    (outside / "secret.png").write_bytes(b"x")
    with pytest.raises(FinetuneError):
        datasets.save_caption(roots, "set", "link.png", "c")  # the link's target is outside: no .txt beside it
    with pytest.raises(FinetuneError):
        datasets.check(roots, str(outside))


def test_compare_grid_is_runs_by_prompts_through_the_hooks(tiny_run, tmp_path):
    import numpy as np
    from PIL import Image

    from finetune.ui.compare import compare_grid

    run = tiny_run("sd1", "lora")
    path, lines = compare_grid([run, run], ["a photo of sks ball", "a ball"], seed=3, steps=2, out=tmp_path / "cmp")
    with Image.open(path) as sheet:
        assert sheet.size == (2 * 64, 2 * 64)
        top, bottom = (np.asarray(sheet.crop(box), dtype=np.float32) for box in ((0, 0, 128, 64), (0, 64, 128, 128)))
    # One run twice from the same seeds: the same row, but for the grid's own invisible watermark.
    assert np.abs(top - bottom).mean() < 1.0 and np.abs(top[:, :64] - top[:, 64:]).mean() > 5
    assert (path.parent / "manifest.jsonl").is_file()  # it went through the output hooks
    with pytest.raises(FinetuneError, match="Compare takes LoRA runs"):
        compare_grid([tiny_run("sd1", "textual_inversion")], ["x"], 0, 2, tmp_path / "cmp2")


def test_the_app_answers_only_with_its_token(tmp_path):
    from finetune.ui.app import build_app, make_context

    ctx = make_context(Roots([tmp_path]))
    with TestClient(build_app(ctx, "s3cret"), follow_redirects=False) as client:
        assert client.get("/").status_code == 401
        assert client.get("/config").status_code == 401
        r = client.get("/?token=s3cret")
        assert r.status_code == 303 and "token" not in r.headers["location"]
        assert client.get("/").status_code == 200  # the cookie it set
    with TestClient(build_app(ctx, None)) as client:
        assert client.get("/").status_code == 200  # localhost without a token


def test_uploads_are_checked_like_training_data_and_never_replace(tmp_path, monkeypatch):
    root = tmp_path / "root"
    incoming = root / "incoming"  # where Gradio keeps its copies: inside the first root (app.serve)
    incoming.mkdir(parents=True)
    draw_subject(1, (64, 64)).save(incoming / "dog.png")
    draw_subject(2, (64, 64)).save(incoming / "big.png")
    (incoming / "fake.png").write_bytes(b"<html>not an image</html>")
    (incoming / "notes.txt").write_text("hello")
    roots = Roots([root])
    monkeypatch.setattr(datasets, "MAX_UPLOAD_BYTES", (incoming / "big.png").stat().st_size - 1)
    (incoming / "dog.png").replace(incoming / "a.png")
    folder, lines = datasets.save_uploads(roots, "photos/new", [str(incoming / n) for n in ("a.png", "fake.png", "notes.txt")])
    assert folder == root / "photos" / "new" and sorted(p.name for p in folder.iterdir()) == ["a.png"]
    assert lines[0] == "added a.png" and lines[1].startswith("skipped fake.png: cannot read image")
    assert lines[2].startswith("skipped notes.txt: not an image file")
    _, again = datasets.save_uploads(roots, "photos/new", [str(incoming / "a.png"), str(incoming / "big.png")])
    assert again[0] == "added a-2.png" and again[1].startswith("skipped big.png: larger than")
    outside = tmp_path / "elsewhere.png"
    draw_subject(3, (64, 64)).save(outside)
    with pytest.raises(FinetuneError):
        datasets.save_uploads(roots, "photos/new", [str(outside)])
    with pytest.raises(FinetuneError):
        datasets.save_uploads(roots, "../escape", [str(incoming / "a.png")])
