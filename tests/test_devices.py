"""Devices and precision: `finetune generate` picks CUDA, then MPS, then the CPU, in the dtype the
device runs well (the choice function's inputs are forced here, so the rule is tested on this CPU
machine); a device that is not there is one line before loading; images made under autocast are
decoded outside it with an fp32 VAE, and on the CPU equal a plain pipeline call bit for bit; a black
image is reported by name; the safety checker judges a batch as it judges each image alone."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import finetune.devices as devices
from finetune.cli import app
from finetune.devices import Availability, Placement, choose, decode_latents, run_pipeline
from finetune.errors import FinetuneError

NONE = Availability()
CUDA = Availability(cuda=True, cuda_count=1, cuda_bf16=True, cuda_name="NVIDIA H100")
OLD_CUDA = Availability(cuda=True, cuda_count=2, cuda_bf16=False, cuda_name="Tesla T4")
MPS = Availability(mps=True, mps_bf16=True)
OLD_MPS = Availability(mps=True, mps_bf16=False)


def pick(available, device=None, dtype=None, family=None):
    p = choose(device, dtype, family=family, available=available)
    return p.device, p.dtype


# --- the rule --------------------------------------------------------------------------------------

def test_best_device_and_its_precision():
    assert pick(NONE) == ("cpu", "fp32")
    assert pick(CUDA) == ("cuda", "fp16")
    assert pick(MPS) == ("mps", "fp16")
    assert pick(Availability(cuda=True, cuda_count=1, mps=True)) == ("cuda", "fp16")  # CUDA before MPS
    # FLUX overflows in fp16: bf16 where the device has it, else full precision; the CPU stays fp32.
    assert pick(CUDA, family="flux") == ("cuda", "bf16")
    assert pick(OLD_CUDA, family="flux") == ("cuda", "fp32")
    assert pick(MPS, family="flux") == ("mps", "bf16")
    assert pick(OLD_MPS, family="flux") == ("mps", "fp32")
    assert pick(NONE, family="flux") == ("cpu", "fp32")
    assert pick(CUDA, family="sdxl") == ("cuda", "fp16")  # the VAE is kept fp32 (below), not the model


def test_overrides_and_what_they_may_not_ask():
    assert pick(CUDA, device="cpu") == ("cpu", "fp32")
    assert pick(CUDA, device="cuda:0", dtype="fp32") == ("cuda:0", "fp32")
    assert pick(OLD_CUDA, device="cuda:1") == ("cuda:1", "fp16")
    assert pick(NONE, dtype="bf16") == ("cpu", "bf16")
    assert pick(CUDA, dtype="bfloat16") == ("cuda", "bf16")
    assert pick(MPS, device="auto", dtype="auto") == ("mps", "fp16")
    assert pick(OLD_CUDA, dtype="half", family="flux") == ("cuda", "fp16")  # asked for: given
    problems = {
        (NONE, "cuda", None): "--device cuda: this machine has no CUDA device (torch sees none); use --device cpu, "
                              "or leave --device out",
        (Availability(cuda_built=False), "CUDA", None): "--device CUDA: this machine has no CUDA device (this torch is "
                                                        "a CPU-only build",
        (MPS, "cuda:0", None): "--device cuda:0: this machine has no CUDA device",
        (OLD_CUDA, "cuda:2", None): "--device cuda:2: this machine has 2 CUDA device(s)",
        (CUDA, "mps", None): "--device mps: Apple MPS is not available here",
        (NONE, "gpu", None): "--device gpu: expected auto, cuda, cuda:N, mps or cpu",
        (NONE, None, "fp16"): "--dtype fp16: fp16 on the CPU is slow",
        (OLD_CUDA, None, "bf16"): "--dtype bf16: this GPU (Tesla T4) has no bf16",
        (OLD_MPS, None, "bf16"): "--dtype bf16: MPS before macOS 14 has no bf16",
        (CUDA, None, "int8"): "--dtype int8: expected auto, fp16, bf16 or fp32",
    }
    for (available, device, dtype), message in problems.items():
        with pytest.raises(FinetuneError) as e:
            choose(device, dtype, available=available)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_dtype_spellings():
    for spelled, name in {"fp16": "fp16", "float16": "fp16", "half": "fp16", "BF16": "bf16", "bfloat16": "bf16",
                          "fp32": "fp32", "float32": "fp32", " auto ": None, None: None}.items():
        assert devices.parse_dtype(spelled) == name


# --- generate follows it ---------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_device_cuda_without_cuda_is_one_line_before_loading(tiny_sd15, tmp_path, monkeypatch):
    import finetune.generate as gen

    monkeypatch.setattr(devices, "probe", lambda: NONE)  # this machine, even where the suite has a GPU

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(gen, "load_pipeline", no_loading)
    for extra, message in ((["--device", "cuda"], "error: --device cuda: this machine has no CUDA device"),
                           (["--dtype", "fp8"], "error: --dtype fp8: expected auto, fp16, bf16 or fp32"),
                           (["--device", "cpu", "--dtype", "fp16"], "error: --dtype fp16: fp16 on the CPU")):
        r = invoke("generate", "--base", tiny_sd15, "--prompt", "a cat", "--out", tmp_path / "g", *extra)
        assert r.exit_code == 1, r.output
        assert r.output.startswith(message) and r.output.strip().count("\n") == 0, r.output
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("base,expected", [("tiny_sd15", ("cuda", "fp16")), ("builtin:tiny-flux", ("cuda", "bf16"))])
def test_generate_places_the_model_by_the_rule(base, expected, request, tmp_path, monkeypatch):
    """The machine is said to have an Ampere GPU; the placement generate hands on is recorded (and not
    carried out: this machine has no GPU), then the images are made where the model is."""
    if base == "tiny_sd15":
        base = request.getfixturevalue("tiny_sd15")
    import finetune.generate as gen

    monkeypatch.setattr(devices, "probe", lambda: CUDA)
    placed = []
    monkeypatch.setattr(devices, "place_pipeline", lambda pipe, placement: placed.append(placement) or pipe)
    monkeypatch.setattr(gen, "_load_options", lambda fam, source, placement: {})  # loaded on the CPU, in fp32
    r = invoke("generate", "--base", base, "--prompt", "a cat", "--steps", "1", "--width", "64", "--height", "64",
               "--out", tmp_path / "g", "--no-hooks")
    assert r.exit_code == 0, r.output
    assert [(p.device, p.dtype) for p in placed] == [expected]
    line = next(x for x in r.output.splitlines() if x.startswith("device:"))
    assert line == ("device: cuda, fp16; the VAE decodes in fp32 (fp16 can overflow it into black images)"
                    if expected[1] == "fp16" else "device: cuda, bf16")


def test_generate_loads_in_the_chosen_dtype(tiny_sd15):
    from finetune.generate import load_pipeline

    pipe, _, placement = load_pipeline(str(tiny_sd15), device="cpu", dtype="bf16")
    assert (placement.device, placement.dtype) == ("cpu", "bf16")
    assert {m.dtype for m in (pipe.unet, pipe.text_encoder, pipe.vae)} == {torch.bfloat16}
    assert devices.vae_dtype("fp16", pipe.vae) == devices.vae_dtype("fp16", dict(pipe.vae.config)) == "fp32"
    assert devices.vae_dtype("fp16", {"force_upcast": False}) == "fp16" and devices.vae_dtype("fp16", None) == "fp32"


def test_placing_keeps_the_vae_in_fp32_where_it_overflows(tiny_sd15):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    devices.place_pipeline(pipe, Placement("cpu", "fp16"))  # casting only: nothing runs in fp16 here
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    devices.place_pipeline(pipe, Placement("cpu", "bf16"))  # bf16 has fp32's range: the VAE follows
    assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16
    pipe.vae.register_to_config(force_upcast=False)  # a VAE that says it is safe in fp16 (the fp16-fix VAE)
    devices.place_pipeline(pipe, Placement("cpu", "fp16"))
    assert pipe.vae.dtype == torch.float16


# --- decoding outside autocast ---------------------------------------------------------------------

def _pipe(base):
    from finetune.generate import load_pipeline

    pipe, _, _ = load_pipeline(str(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(**extra):
    return dict(prompt="a cat", num_inference_steps=2, guidance_scale=3.0, width=64, height=64,
                num_images_per_prompt=2, generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4)], **extra)


@pytest.mark.parametrize("base", ["tiny_sd15", "builtin:tiny-sdxl"])
def test_decoding_outside_autocast_is_the_pipeline_itself_on_cpu(base, request):
    pipe = _pipe(request.getfixturevalue(base) if base == "tiny_sd15" else base)
    # Ours decodes one image at a time: diffusers' own sliced decode is the reference.
    pipe.vae.enable_slicing()
    plain = pipe(**_call()).images
    pipe.vae.disable_slicing()
    calls = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    ours = run_pipeline(pipe, None, **_call())
    hook.remove()
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, ours))
    assert calls == [1, 1] and pipe.vae.use_slicing is False  # sliced for the call only

    # Under (bf16) autocast the decoder still runs outside it, in fp32.
    seen = []
    decode = pipe.vae.decode

    def spy(z, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), z.dtype, pipe.vae.dtype))
        return decode(z, *a, **k)

    pipe.vae.decode = spy
    images = run_pipeline(pipe, lambda: torch.autocast("cpu", dtype=torch.bfloat16), **_call())
    assert seen == [(False, torch.float32, torch.float32)] and len(images) == 2
    # A VAE in fp16 that overflows there is decoded in fp32 and handed back in fp16.
    pipe.vae.to(torch.float16)
    seen.clear()
    latents = pipe(**_call(output_type="latent")).images
    decode_latents(pipe, latents)
    assert seen == [(False, torch.float32, torch.float32)] and pipe.vae.dtype == torch.float16


def test_flux_latents_are_unpacked_and_shifted_as_the_pipeline_does():
    pipe = _pipe("builtin:tiny-flux")
    pipe.vae.enable_slicing()  # ours decodes one image at a time
    plain = pipe(**_call()).images
    pipe.vae.disable_slicing()
    ours = run_pipeline(pipe, None, **_call())
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, ours))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_a_black_image_is_reported_by_name(tiny_sd15, tmp_path):
    from finetune.hooks import build_pipeline
    from finetune.train.sampling import Destination, Sampling, emit_images

    pipe = _pipe(tiny_sd15)
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (torch.full_like(decode(z, *a, **k)[0], float("nan")),)  # an overflow
    logs = []
    written = emit_images(pipe, ["a cat"], Sampling(seed=0, n=1, steps=1, width=64, height=64),
                          Destination(tmp_path, build_pipeline([{"type": "provenance"}]), log=logs.append))
    assert [p.name for p in written] == ["00-a-cat-0.png"]
    assert np.asarray(Image.open(written[0])).max() < 8
    assert [line for line in logs if "black" in line] == [
        "warning: black image: 00-a-cat-0.png: every pixel is black as generated: a numeric overflow (NaN) in the "
        "model or its VAE; try --dtype fp32"]
    (row,) = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert row["verdicts"][-1]["action"] == "warning" and "black image" in row["verdicts"][-1]["reason"]


# --- the safety checker, batched -------------------------------------------------------------------

def test_safety_checker_batch_gives_the_verdicts_of_one_at_a_time(tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    from finetune.hooks.base import OutputImage, Provenance
    from finetune.hooks.pipeline import OutputPipeline
    from finetune.hooks.safety_checker import SafetyCheckerConfig, SafetyCheckerHook
    from finetune.train.sampling import screen_batch

    from .test_safety_checker import make_checker

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(8)]
    hook = SafetyCheckerHook(SafetyCheckerConfig(weights=str(make_checker(tmp_path / "c", False))))
    # Thresholds between the images' scores, so some images are flagged and some are not.
    with torch.no_grad():
        pixels = hook.processor(images=images, return_tensors="pt").pixel_values
        embeds = hook.checker.visual_projection(hook.checker.vision_model(pixels)[1])
        top = cosine_distance(embeds, hook.checker.concept_embeds).max(dim=1).values.sort().values
        hook.checker.concept_embeds_weights.fill_(float(top[3] + top[4]) / 2)
    alone = [hook.flags([image])[0] for image in images]
    assert hook.flags(images) == alone and 0 < sum(alone) < len(images)

    calls = []
    forward = hook.checker.forward
    hook.checker.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    pipeline = OutputPipeline([hook])
    screen_batch(pipeline, images)
    items = [pipeline.process(OutputImage(image, Provenance(prompt="p"))) for image in images]
    assert [bool(item.rejected) for item in items] == alone and len(calls) == 1  # one pass for the batch
    other = images[0].copy()  # an image the batch did not hold is judged on its own
    assert bool(pipeline.process(OutputImage(other, Provenance(prompt="p"))).rejected) == alone[0]
    assert len(calls) == 2
