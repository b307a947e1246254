"""The metric layer of `finetune eval` behaves as metrics on constructed inputs, with the tiny
locally built CLIP / DINOv2 (nothing downloaded)."""

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.eval.metrics import (MIN_IMAGES_FOR_FD, clip_i, clip_score, dino_similarity, frechet_distance, kid,
                                   load_metric_model, pairwise_diversity)
from finetune.tiny_models.metric_models import build_tiny_clip, build_tiny_dinov2, tied_clip_image


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("metric-models")
    clip, _ = load_metric_model("clip", str(build_tiny_clip(root / "clip")))
    tied, _ = load_metric_model("clip", str(build_tiny_clip(root / "clip-tied", tied=True)))
    dino, _ = load_metric_model("dino", str(build_tiny_dinov2(root / "dino")))
    return {"clip": clip, "tied": tied, "dino": dino}


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_image_with_itself_is_one(models):
    image, others = _images(1), _images(3, seed=1)
    for m, metric in ((models["clip"], clip_i), (models["dino"], dino_similarity)):
        assert metric(m.model, m.processor, image, image) == pytest.approx(1.0, abs=1e-5)
        assert metric(m.model, m.processor, image * 3, image) == pytest.approx(1.0, abs=1e-5)
        assert metric(m.model, m.processor, others, image) < 1.0 - 1e-4


def test_builds_are_deterministic(tmp_path):
    a = build_tiny_dinov2(tmp_path / "a", seed=3)
    b = build_tiny_dinov2(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_clip_score_prefers_matching_prompts(models):
    m = models["tied"]
    prompts = ["cat", "dog", "sky blue", "a red fox"]
    images = [tied_clip_image(p, m.processor.tokenizer) for p in prompts]
    matched = clip_score(m.model, m.processor, images, prompts)
    swapped = clip_score(m.model, m.processor, images, prompts[1:] + prompts[:1])
    assert matched == pytest.approx(100.0, abs=1e-3)
    assert swapped < matched - 10
    assert 0 <= swapped


def test_clip_score_needs_one_prompt_per_image(models):
    m = models["clip"]
    with pytest.raises(ValueError, match="2 images and 1 prompts"):
        clip_score(m.model, m.processor, _images(2), ["a cat"])


def _features(n=64, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_sets_have_no_distance_and_shifted_sets_do():
    a, other = _features(seed=0), _features(seed=1)
    shifted = other + 1.0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, shifted) > frechet_distance(a, other) + 1.0
    kid_same, _ = kid(a, a, subset_size=32)
    kid_other, _ = kid(a, other, subset_size=32)
    kid_shifted, _ = kid(a, shifted, subset_size=32)
    assert abs(kid_same) < 0.05 * kid_shifted
    assert kid_shifted > kid_other
    assert kid(a, shifted, subset_size=32) == (kid_shifted, kid(a, shifted, subset_size=32)[1])  # seeded


def test_too_few_images_for_fd_says_how_many_and_suggests_kid():
    few = _features(n=MIN_IMAGES_FOR_FD - 1)
    with pytest.raises(ValueError, match=rf"at least {MIN_IMAGES_FOR_FD} images.*got {MIN_IMAGES_FOR_FD - 1}.*KID"):
        frechet_distance(few, few)


def test_diversity_is_zero_for_a_collapsed_set_and_positive_otherwise():
    assert pairwise_diversity(_features(n=5).new_ones(5, 8)) == pytest.approx(0.0, abs=1e-6)
    assert pairwise_diversity(_features(n=5)) > 0.1
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_diversity(_features(n=1))


def test_missing_model_offline_is_none_with_a_reason(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, reason = load_metric_model("dino", "no-such-org/no-such-dinov2")
    assert model is None
    assert "offline" in reason and "no-such-org/no-such-dinov2" in reason
    model, reason = load_metric_model("clip", str(tmp_path))
    assert model is None and "does not hold a clip model" in reason
