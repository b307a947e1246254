"""memory.cache_dir: latents and text embeddings computed before the first step, written as safetensors
files keyed by content and settings, reused by the next run of the same data (which then runs no VAE
and no text encoder at all) and trained on exactly as the in-memory caches are; a changed key part
makes new entries, a damaged file is recomputed, never read."""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.recipe.loader import load_recipe
from finetune.train import train

CLASS_PROMPT = "a photo of a robot"


def _quickstart(tmp: Path, name: str, cache: Path | None = None, *more: str):
    """The tiny SD1.5 quickstart for a few steps, with caption dropout (the empty caption must be cached
    too) and prior preservation (class latents and the class prompt too)."""
    overrides = ["training.max_steps=3", "validation.prompts=[]", "optimizer.type=adamw",
                 "output.save_every_n_steps=null", f"output.dir={tmp / 'out'}", f"output.run_name={name}",
                 "data.caption_dropout=0.5", "prior_preservation.enabled=true",
                 f"prior_preservation.class_prompt={CLASS_PROMPT}", "prior_preservation.num_class_images=2",
                 f"prior_preservation.class_data_dir={tmp / 'class'}", "prior_preservation.num_inference_steps=2",
                 *([f"memory.cache_dir={cache}"] if cache else []), *more]
    return load_recipe("quickstart", overrides)


def _train(recipe_and_path, before_caching=None, after_caching=None):
    """train() with `before_caching(c)` / `after_caching(c, feed)` called around the caches' making
    (the models are loaded and the class images made by then)."""
    from finetune.train import feed as feed_module

    build = feed_module.build_feed

    def wrapped(run, accelerator, text_cached=None):
        if before_caching:
            before_caching(run.c)
        feed = build(run, accelerator, text_cached)
        if after_caching:
            after_caching(run.c, feed)
        return feed

    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(feed_module, "build_feed", wrapped)
        result = train(recipe_and_path[0], recipe_and_path[1], log=logs.append, progress=False)
    return result, logs


def _encoders(c) -> dict[str, torch.nn.Module]:
    # vae.encode() runs vae.encoder (AutoencoderKL.forward is never called when training).
    return {"vae": c.vae.encoder, **c.text_encoders}


def _forbid(c, _feed=None) -> None:
    def boom(module, _args):
        raise AssertionError(f"{type(module).__name__} ran after the caches were made")

    for module in _encoders(c).values():
        module.register_forward_pre_hook(boom)


def _files(cache: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(cache)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*.safetensors")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk-cache")
    cache = tmp / "cache"
    out = {"tmp": tmp, "cache": cache}

    def flags(c, feed):
        out["flags"] = (feed.latents_precomputed, feed.text_precomputed)
        _forbid(c)

    out["memory"] = _train(_quickstart(tmp, "memory"), after_caching=flags)

    calls = {"vae": 0, "text": 0}

    def count(c):
        for name, module in _encoders(c).items():
            kind = "vae" if name == "vae" else "text"
            module.register_forward_hook(lambda *_a, kind=kind: calls.update({kind: calls[kind] + 1}))

    out["first"] = _train(_quickstart(tmp, "first", cache), before_caching=count)
    out["calls"] = dict(calls)
    out["files"] = _files(cache)
    # Any encoder call, while caching or in a step, raises: the second run must find everything.
    out["second"] = _train(_quickstart(tmp, "second", cache), before_caching=_forbid)
    return out


def test_memory_caches_cover_every_step_so_no_encoder_runs_in_training(runs):
    """With the encoders made to raise once the caches exist, the in-memory run still trains: every
    caption it draws (dropout's empty one, the class prompt) and every latent was computed up front."""
    result, _ = runs["memory"]
    assert runs["flags"] == (True, True)
    assert result.steps == 3 and all(loss == loss for loss in result.losses)


def test_first_disk_run_writes_one_file_per_image_and_caption_and_trains_what_memory_trains(runs):
    cache = runs["cache"]
    latents, texts = list((cache / "latents").glob("*.safetensors")), list((cache / "text").glob("*.safetensors"))
    # 8 robot images + 2 class images; the 8 captions, the empty one (dropout) and the class prompt.
    assert (len(latents), len(texts)) == (10, 10)
    # Each encoded exactly once: one VAE encoder pass per latent file, one text-encoder pass per caption.
    assert runs["calls"] == {"vae": 10, "text": 10}
    assert not list(cache.rglob(".tmp-*"))
    assert runs["first"][0].losses == runs["memory"][0].losses
    logs = runs["first"][1]
    assert any(line.startswith("latents: 8 cached on disk, 0 reused") for line in logs), logs
    assert any(line.startswith("disk cache: ") and "10 latents (" in line and "10 text embeddings (" in line
               and "host RAM holds one batch" in line for line in logs), logs


def test_second_disk_run_encodes_nothing_rewrites_nothing_and_trains_the_same(runs):
    result, logs = runs["second"]  # its VAE and text encoders raise if called at all
    assert _files(runs["cache"]) == runs["files"]
    assert result.losses == runs["memory"][0].losses
    assert any(line.startswith("latents: 8 cached on disk, 8 reused") for line in logs), logs
    assert any(line.startswith("text embeddings: 10 cached on disk, 10 reused") for line in logs), logs


def test_damaged_cache_files_are_computed_again_not_read(runs, tmp_path):
    from finetune.train.disk_cache import read_entry

    cache = tmp_path / "cache"
    shutil.copytree(runs["cache"], cache)
    latent = sorted((cache / "latents").glob("*.safetensors"))[0]
    text = sorted((cache / "text").glob("*.safetensors"))[0]
    latent.write_bytes(latent.read_bytes()[:-7])  # truncated: an interrupted copy
    data = bytearray(text.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the tensor data: the header still parses
    text.write_bytes(bytes(data))
    result, logs = _train(_quickstart(runs["tmp"], "damaged", cache))
    assert result.losses == runs["memory"][0].losses
    damaged = [line for line in logs if "is damaged" in line]
    assert len(damaged) == 2 and str(latent) in damaged[0] + damaged[1] and str(text) in damaged[0] + damaged[1]
    read_entry(latent), read_entry(text)  # whole again
    line = re.compile(r"^(?:latents|text embeddings): \d+ cached on disk, (\d+) reused")
    reused = [int(m.group(1)) for m in map(line.match, logs) if m]
    assert sum(reused) == 20 - 2, logs  # 10 latents and 10 captions, two of them made again


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SD1.5's components and a dataset of four images, for calling the disk cache directly."""
    from finetune.data import ImageCaptionDataset, discover_examples
    from finetune.families import get_family
    from finetune.families.base import resolve_source
    from finetune.recipe.schema import DataConfig, ModelConfig

    from .helpers import make_image_folder

    data = make_image_folder(tmp_path_factory.mktemp("keys") / "data", n=4, sizes=((64, 64),))
    family = get_family("sd1")
    c = family.load(resolve_source("builtin:tiny-sd15"), ModelConfig(base="builtin:tiny-sd15"))

    def dataset(resolution: int = 64):
        cfg = DataConfig(path=str(data), resolution=resolution)
        return ImageCaptionDataset(discover_examples(cfg), cfg, seed=0)

    return family, c, dataset


def _latent_files(family, c, dataset, cache: Path, seed: int) -> list[str]:
    from accelerate import PartialState

    from finetune.train.disk_cache import DiskCache, LatentEncoder, latent_identity

    disk = DiskCache.open(str(cache), PartialState(), lambda _line: None)
    identity = latent_identity(family, c, torch.float32, torch.device("cpu"))
    paths, _ = disk.latents(dataset, seed, LatentEncoder(lambda px: family.encode_images(c, px), torch.float32,
                                                         identity), None)
    return sorted(p.name for p in paths.values())


def _text_files(family, c, cache: Path, captions: list[str]) -> list[str]:
    from functools import partial

    from accelerate import PartialState

    from finetune.train.caches import encode_caption
    from finetune.train.disk_cache import DiskCache, text_identity

    disk = DiskCache.open(str(cache), PartialState(), lambda _line: None)
    identity = text_identity(family, c, torch.device("cpu"))
    paths = disk.texts(captions, partial(encode_caption, family, c), identity, None)
    return sorted(p.name for p in paths.values())


@contextmanager
def _nudged(weight: torch.Tensor):
    """One element of `weight` changed by 1e-3 for the block, then put back exactly."""
    index = (0,) * weight.ndim
    old = weight[index].item()
    with torch.no_grad():
        weight[index] += 1e-3
        try:
            yield
        finally:
            weight[index] = old


def test_a_changed_seed_resolution_or_vae_makes_new_latent_entries(tiny, tmp_path):
    family, c, dataset = tiny
    first = _latent_files(family, c, dataset(), tmp_path, seed=0)
    assert len(first) == 4 and _latent_files(family, c, dataset(), tmp_path, seed=0) == first
    changes = [_latent_files(family, c, dataset(), tmp_path, seed=1),
               _latent_files(family, c, dataset(96), tmp_path, seed=0)]
    with _nudged(c.vae.encoder.conv_in.weight):  # another VAE: a fine-tune, a different model.vae
        changes.append(_latent_files(family, c, dataset(), tmp_path, seed=0))
    for names in changes:
        assert len(names) == 4 and not set(names) & set(first)
    assert len(list(tmp_path.glob("latents/*.safetensors"))) == 16


def test_a_changed_caption_or_text_encoder_makes_new_text_entries(tiny, tmp_path):
    family, c, _ = tiny
    first = _text_files(family, c, tmp_path, ["a photo of sks ball", ""])
    assert len(first) == 2 and set(_text_files(family, c, tmp_path, ["a photo of sks ball"])) < set(first)
    assert not set(_text_files(family, c, tmp_path, ["a photo of sks balls"])) & set(first)
    with _nudged(c.text_encoders["text_encoder"].get_input_embeddings().weight):
        changed = _text_files(family, c, tmp_path, ["a photo of sks ball", ""])
    assert not set(changed) & set(first)


def test_a_file_damaged_while_the_run_reads_it_stops_the_run_with_one_line(tiny, tmp_path):
    from finetune.train.disk_cache import DiskEntries

    family, c, dataset = tiny
    _latent_files(family, c, dataset(), tmp_path, seed=0)
    path = sorted((tmp_path / "latents").glob("*.safetensors"))[0]
    entries = DiskEntries({"img": path}, "latent")
    assert entries["img"].shape[0] == 4
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(FinetuneError) as err:
        entries["img"]
    assert str(err.value).startswith("memory.cache_dir: ") and "\n" not in str(err.value)


def test_a_caption_missing_from_the_text_cache_is_an_internal_error_not_an_encoder_call():
    from finetune.train.caches import TextCache

    cache = TextCache({"a photo": {"encoder_hidden_states": torch.zeros(3, 4)}}, torch.device("cpu"))
    assert cache(["a photo", "a photo"])["encoder_hidden_states"].shape == (2, 3, 4)
    with pytest.raises(RuntimeError, match="internal error: caption 'another' was not encoded"):
        cache(["a photo", "another"])


def test_a_cache_dir_that_cannot_be_a_folder_is_one_line(tmp_path):
    from accelerate import PartialState

    from finetune.train.disk_cache import DiskCache, cache_dir_problem

    (tmp_path / "file").write_text("not a folder")
    assert "is a file" in cache_dir_problem(str(tmp_path / "file" / "cache"))
    assert cache_dir_problem(str(tmp_path / "new" / "cache")) is None
    with pytest.raises(FinetuneError, match=r"^memory.cache_dir: .*file is a file, not a folder"):
        DiskCache.open(str(tmp_path / "file" / "cache"), PartialState(), print)
