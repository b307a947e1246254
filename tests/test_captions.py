"""Tag captions (data.shuffle_tags, keep_tokens, tag_dropout): the kept tags stay first and in order,
no tag is lost or doubled without dropout, dropout leaves out about its rate and never a kept tag,
every caption is a function of (seed, index, epoch) alone, and a run with varying captions encodes
them each step (no text cache, latents still cached), refuses an explicit text cache before any
model loads, and resumes exactly."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune.data import ImageCaptionDataset, discover_examples
from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import validate
from finetune.recipe.schema import DataConfig
from finetune.train import train

from .helpers import make_image_folder, step_rows, tiny_recipe

TAGS = ["sks", "ball", "red", "round", "shiny", "small", "toy", "studio"]
EPOCHS = 40


def _tag_folder(folder, n: int = 3):
    """`n` images whose captions are TAGS plus 'view i', written with untidy spacing and a trailing comma."""
    make_image_folder(folder, n=n, sizes=((64, 64),))
    for i in range(n):
        (folder / f"img{i}.txt").write_text(" ,".join(TAGS) + f",  view {i} ,")
    return folder


def _tags(i: int) -> list[str]:
    return TAGS + [f"view {i}"]


def _dataset(folder, seed: int = 0, **data) -> ImageCaptionDataset:
    cfg = DataConfig(path=str(folder), resolution=64, bucketing={"enabled": False}, **data)
    return ImageCaptionDataset(discover_examples(cfg), cfg, seed=seed)


def _draws(ds):
    """(index, epoch, caption's tags) over every item and EPOCHS epochs."""
    return [(i, e, ds.caption(i, e).split(", ")) for i in range(len(ds)) for e in range(EPOCHS)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _tag_folder(tmp_path_factory.mktemp("tags") / "data")


def test_kept_tags_stay_first_and_every_tag_appears_once_when_shuffled(folder):
    ds = _dataset(folder, shuffle_tags=True, keep_tokens=2, repeats=2)
    orders = {}
    for i, e, tags in _draws(ds):
        assert tags[:2] == ["sks", "ball"]
        assert sorted(tags) == sorted(_tags(i % 3)), tags  # whitespace gone, no tag lost, none doubled
        orders.setdefault(i, set()).add(tuple(tags))
    # 7 shuffled tags have 5040 orders: 40 epochs draw nearly all distinct ones, for every item.
    assert all(len(seen) >= EPOCHS - 3 for seen in orders.values()), {i: len(s) for i, s in orders.items()}
    assert ds.caption(0, 0) != ds.caption(3, 0)  # a repeat of the same image is shuffled on its own


def test_tag_dropout_keeps_order_rate_and_the_kept_tags(folder):
    rate = 0.25
    ds = _dataset(folder, tag_dropout=rate, keep_tokens=1)
    dropped = total = 0
    for i, e, tags in _draws(ds):
        assert tags[0] == "sks"
        rest = _tags(i)[1:]
        assert tags[1:] == [t for t in rest if t in tags[1:]]  # a subsequence: no shuffle asked for
        dropped += len(rest) - len(tags) + 1
        total += len(rest)
    # 3 x 40 x 8 = 960 draws: the rate's standard error is 0.014.
    assert abs(dropped / total - rate) < 0.05, dropped / total


def test_a_caption_depends_on_seed_index_and_epoch_alone(folder):
    data = dict(shuffle_tags=True, keep_tokens=1, tag_dropout=0.2, caption_dropout=0.3)
    ds = _dataset(folder, **data)
    draws = _draws(ds)
    fresh = _dataset(folder, **data)  # as a DataLoader worker or a resumed run builds it
    assert draws == _draws(fresh)
    assert [ds.item(i, e)["caption"] for i in range(3) for e in range(2)] == \
        [fresh.caption(i, e) for i in range(3) for e in range(2)]
    ds.set_epoch(5)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    assert [item["caption"] for item in loader] == [fresh.caption(i, 5) for i in range(3)]
    assert _draws(_dataset(folder, seed=1, **data)) != draws
    # Caption dropout comes first, from its own stream: the same items drop out as without tags varied.
    plain = _dataset(folder, caption_dropout=0.3)
    assert [tags == [""] for *_, tags in draws] == [plain.caption(i, e) == "" for i, e, _ in draws]
    assert any(tags == [""] for *_, tags in draws)


def test_nonsense_and_an_explicit_text_cache_are_refused_naming_the_key(tmp_path):
    raw = tiny_recipe(tmp_path / "model", tmp_path / "data", tmp_path / "out")
    for data, key in (({"shuffle_tags": True, "cache_text_embeddings": True}, "data.cache_text_embeddings"),
                      ({"tag_dropout": 0.1, "cache_text_embeddings": True}, "data.cache_text_embeddings"),
                      ({"keep_tokens": 2}, "data.keep_tokens"),
                      ({"shuffle_tags": True, "tag_dropout": 1.0}, "data.tag_dropout")):
        with pytest.raises(RecipeError, match=rf"^recipe.yaml: {key}: "):
            validate({**raw, "data": {**raw["data"], **data}}, "recipe.yaml")
    # Dropout alone is a use of its own, and keep_tokens protects tags from it.
    validate({**raw, "data": {**raw["data"], "tag_dropout": 0.1, "keep_tokens": 1}}, "recipe.yaml")


# ------------------------------------------------------------------ a run on the tiny SD1.5


@pytest.fixture(scope="module")
def shuffled_run(tiny_sd15, tmp_path_factory, one_torch_thread):
    """Four steps over three images (an epoch boundary at step 3) with tags shuffled and dropped, a
    checkpoint at step 2, latents on disk and text encoders asked to offload."""
    tmp = tmp_path_factory.mktemp("shuffled")
    raw = tiny_recipe(tiny_sd15, _tag_folder(tmp / "data"), tmp / "out", training__batch_size=1,
                      output__save_every_n_steps=2)
    raw["data"].update(shuffle_tags=True, keep_tokens=1, tag_dropout=0.2)
    raw["memory"] = {"cache_dir": str(tmp / "cache"), "text_encoders": "offload"}
    logs = []
    result = train(validate(raw, "t"), log=logs.append, progress=False)
    return raw, result, logs, tmp


def test_varying_captions_train_without_a_text_cache(shuffled_run):
    raw, result, logs, tmp = shuffled_run
    assert result.steps == 4
    off = [x for x in logs if x.startswith("data.cache_text_embeddings: auto -> off")]
    assert len(off) == 1 and "text encoder runs on each batch" in off[0], logs
    # Text encoders stay where they are: the step needs them.
    assert any(x.startswith("memory.text_encoders: kept on cpu") and "not cached" in x for x in logs), logs
    cache = tmp / "cache"
    assert list((cache / "latents").rglob("*.safetensors")) and not list(cache.rglob("text/*.safetensors"))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in step_rows(result.run_dir))
    lora_b = {k: v for k, v in load_file(result.run_dir / "pytorch_lora_weights.safetensors").items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: it trained


def test_resume_with_shuffled_tags_matches_the_uninterrupted_run(shuffled_run):
    raw, result, _, tmp = shuffled_run
    ref = result.run_dir
    run = tmp / "out" / "resumed"
    shutil.copytree(ref, run)
    for leftover in ("README.md", "pytorch_lora_weights.safetensors"):  # as if stopped after step 2
        (run / leftover).unlink()
    resumed = train(validate(raw, "t"), log=lambda *_: None, progress=False,
                    resume=str(run / "checkpoints" / "step-000002"))
    assert resumed.steps == 4
    a, b = load_file(ref / "pytorch_lora_weights.safetensors"), load_file(run / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with other weights"
    assert [r["loss"] for r in step_rows(run)] == [r["loss"] for r in step_rows(ref)]


def test_an_explicit_text_cache_is_refused_for_a_recipe_built_without_validation(shuffled_run):
    # model_copy skips the validators; the run still refuses, in one line, before caching anything.
    from finetune.families import get_family
    from finetune.methods import get_method
    from finetune.train.setup import decide_caching

    raw, result, _, tmp = shuffled_run
    recipe = validate(raw, "t")
    method = get_method(recipe.method, get_family("sd1"), recipe.training)
    assert decide_caching(recipe, _dataset(tmp / "data", shuffle_tags=True), method) == (True, False)
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"cache_text_embeddings": True})})
    with pytest.raises(FinetuneError, match="^data.cache_text_embeddings: captions vary per step"):
        decide_caching(recipe, _dataset(tmp / "data", shuffle_tags=True), method)
