"""The recipe: every key a YAML recipe may hold, with its type, default and allowed values.

Unknown keys are rejected (`extra="forbid"`), so a typo is an error rather than a silent no-op.
Cross-field rules that do not need a model (resolution vs. VAE scale, epochs vs. steps) live here
too, so `finetune validate` catches them before anything loads.
"""

from __future__ import annotations

import reprlib
from typing import Annotated, Literal, Union  # noqa: F401

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..config_base import Section as _Section
from ..families._flow import FlowOptions

# Upper bounds: far past any real run, low enough that a typo (an extra zero or three) is refused
# here rather than as a MemoryError, or a run that would not end, after the model has loaded.
MAX_STEPS = 10_000_000
MAX_BATCH = 4096
MAX_SIDE = 4096  # pixels: 4x SDXL's and FLUX's native side, 8x SD1.5's
MAX_SEED = 2**32 - 1  # numpy's (and so accelerate's set_seed's) range
MAX_LR = 10.0
MAX_INFERENCE_STEPS = 1000
MAX_GUIDANCE = 100.0


class Section(_Section):
    # inf and nan would pass `gt=0`/`ge=0` and only surface as a NaN loss (or never, as a hang).
    model_config = ConfigDict(allow_inf_nan=False)


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class ModelConfig(Section):
    base: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Hub id, local diffusers folder, single-file .safetensors checkpoint, or builtin:tiny-sd15.",
    )
    family: str = Field("auto", description="Model family (sd1, ...); auto detects it from the model.")
    config: str | None = Field(
        None, description="For a single-file checkpoint: a diffusers folder or hub id whose configs describe it.")
    revision: str | None = None
    variant: str | None = Field(None, description="Weight variant on the hub, e.g. fp16.")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Override the scheduler's prediction type (v_prediction for SD2.x 768 models).")
    allow_pickle: bool = Field(False, description="Allow loading pickled .ckpt/.bin weights (unsafe).")
    flow: FlowOptions = Field(default_factory=FlowOptions, description=(
        "Rectified-flow families (FLUX.1, SD3, FLUX.2, Qwen-Image, Z-Image): timestep sampling and shift, "
        "guidance embedding, loss weighting (finetune/families/_flow.py)."))
    flux: FlowOptions | None = Field(None, description="The older name of model.flow; still read.")
    vae: str | None = Field(None, description=(
        "A different VAE (diffusers folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix. The VAE runs in "
        "fp32 during training either way; samples and generation use it as loaded."))

    @model_validator(mode="after")
    def _older_flow_name(self):
        if self.flux is not None:
            if "flow" in self.model_fields_set:
                raise ValueError("flux: the older name of model.flow; keep one of the two")
            self.flow, self.flux = self.flux, None
        return self

    @field_validator("family")
    @classmethod
    def _known_family(cls, v):
        from ..families import FAMILIES

        if v != "auto" and v not in FAMILIES.names():
            raise ValueError(f"unknown family {reprlib.repr(v)}; "
                             f"expected auto or one of: {', '.join(FAMILIES.names())}")
        return v


class BucketConfig(Section):
    enabled: bool = Field(True, description="Group images by aspect ratio so non-square photos keep their framing.")
    min_size: int | None = Field(None, ge=8, le=2 * MAX_SIDE,
                                 description="Smallest bucket side in pixels; default resolution/2.")
    max_size: int | None = Field(None, ge=8, le=2 * MAX_SIDE,
                                 description="Largest bucket side in pixels; default resolution*2.")


class DataConfig(Section):
    path: str = Field(..., min_length=1,
                      description="Image folder, metadata.jsonl/.csv file or folder, or a datasets name/folder.")
    source: Literal["auto", "folder", "metadata", "datasets"] = "auto"
    image_column: str = "image"
    caption_column: str = "text"
    split: str = "train"
    caption_extension: str = ".txt"
    instance_prompt: str | None = Field(None, description="Caption for images that have none (e.g. 'a photo of sks dog').")
    resolution: int = Field(512, ge=64, le=MAX_SIDE, description="Training side length in pixels (area for buckets).")
    # = finetune.data.images.DEFAULT_MAX_PIXELS, not imported: finetune.data pulls in torch.
    max_pixels: int = Field(128_000_000, gt=0, le=2**31 - 1, description=(
        "Images with more pixels are skipped, never decoded (decompression bombs); 128 MP admits 108 MP phone photos."))
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    shuffle_tags: bool = Field(False, description=(
        "Shuffle the comma-separated tags of each caption every step (kohya's shuffle_caption), for tag "
        "captions ('1girl, red hair, smile'); the first keep_tokens stay in place. The text cache turns off."))
    keep_tokens: int = Field(0, ge=0, le=1000, description=(
        "Tags at the start of a caption that shuffle_tags and tag_dropout never move or drop (the trigger "
        "word, the character name); counted in tags, as kohya's keep_tokens."))
    tag_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Chance that each tag after the kept ones is left out, drawn every step (kohya's "
        "caption_tag_dropout_rate; 0.05-0.1 is usual). The text cache turns off."))
    tag_separator: str = Field(",", min_length=1, description=(
        "What separates tags (shuffle_tags, tag_dropout); the tags are joined again with ', '."))
    repeats: int = Field(1, ge=1, le=10_000)
    bucketing: BucketConfig = Field(default_factory=BucketConfig)
    cache_latents: Literal["auto", True, False] = Field(
        "auto", description="Encode images once; auto = on when crops and flips are deterministic.")
    cache_text_embeddings: Literal["auto", True, False] = Field(
        "auto", description=("Encode captions once; auto = on when the text encoder is frozen and captions "
                             "do not change per step (shuffle_tags, tag_dropout)."))
    num_workers: int = Field(0, ge=0, le=256)
    follow_symlinks: bool = Field(False, description=(
        "Read files reached through symlinks that leave the data folder; off: they are skipped and named."))
    validation_split: float = Field(0.0, ge=0.0, le=0.5, description=(
        "Fraction of the images kept out of training (chosen by training.seed) for the held-out val_loss; 0: none."))
    validation_path: str | None = Field(None, min_length=1, description=(
        "Held-out images of their own (a folder or metadata file, read like data.path), instead of a split."))
    masks: str | None = Field(None, min_length=1, description=(
        "Weight the loss per pixel so a photo trains on its subject, not its background: a folder of grayscale "
        "masks named like the images (masks/shoe.png for shoe.jpg; white trains, black is ignored; found like "
        "data.path), or alpha (each image's own transparency). Images without a usable mask train unmasked."))
    unmasked_weight: float = Field(0.0, ge=0.0, le=1.0, description=(
        "The loss weight of black mask pixels: 0 ignores the background entirely; 0.1 keeps a little of it."))
    normalize_masked_loss: bool = Field(True, description=(
        "Divide each image's masked loss by its mask's weight, so a small subject trains as strongly as a large "
        "one at the same learning rate (OneTrainer); false: the loss shrinks with the mask's area (kohya)."))

    @model_validator(mode="after")
    def _mask_keys(self):
        # Only a value other than the default: a run's recipe.yaml spells every default out.
        if self.masks is None:
            for key, default in (("unmasked_weight", 0.0), ("normalize_masked_loss", True)):
                if getattr(self, key) != default:
                    raise ValueError(f"{key}: needs data.masks (a folder of masks, or alpha)")
        elif self.unmasked_weight == 1.0:
            raise ValueError("unmasked_weight: 1 weighs the background like the subject, so data.masks would "
                             "change nothing; use less than 1, or unset data.masks")
        return self

    @field_validator("resolution")
    @classmethod
    def _vae_multiple(cls, v):
        # The VAE downsamples 8x; latents of any size then pass the UNet (diffusers pads odd sizes).
        if v % 8:
            raise ValueError(f"{v} is not a multiple of 8 (the VAE's scale factor); try {max(8, round(v / 8) * 8)}")
        return v

    @property
    def captions_vary(self) -> bool:
        """A caption's text changes from step to step (tags shuffled or dropped), so it cannot be encoded once."""
        return self.shuffle_tags or self.tag_dropout > 0

    @model_validator(mode="after")
    def _tags(self):
        if self.keep_tokens and not self.captions_vary:
            raise ValueError("keep_tokens: keeps tags in place under data.shuffle_tags or data.tag_dropout, and "
                             "neither is on; set shuffle_tags: true (or a tag_dropout), or remove keep_tokens")
        if self.cache_text_embeddings is True and self.captions_vary:
            raise ValueError("cache_text_embeddings: data.shuffle_tags / data.tag_dropout change the captions every "
                             "step, so they cannot be encoded once; set it to auto or false (the text encoder "
                             "then runs each step)")
        return self


def _method_union():
    from ..methods import METHODS

    configs = tuple(cls.Config for _, cls in METHODS.items())
    return Annotated[Union[configs], Field(discriminator="type")] if len(configs) > 1 else configs[0]


MethodConfig = _method_union()


# The options only one optimizer.type reads (finetune/train/optim.py), and the optimizer that reads them.
OPTIMIZER_OWN_OPTIONS = {"d_coef": "prodigy", "use_bias_correction": "prodigy", "safeguard_warmup": "prodigy",
                         "r": "adamw_schedulefree", "relative_step": "adafactor", "scale_parameter": "adafactor",
                         "warmup_init": "adafactor"}


class OptimizerConfig(Section):
    type: Literal["adamw", "adamw8bit", "lion8bit", "lion", "sgd", "prodigy", "adamw_schedulefree", "adafactor"] = Field(
        "adamw", description=(
            "adamw8bit/lion8bit use bitsandbytes and cut optimizer memory by ~4x. prodigy (prodigyopt) estimates "
            "its own step size: training.learning_rate 1.0, scheduler constant. adamw_schedulefree (schedulefree) "
            "needs no schedule (constant; training.lr_warmup_steps is its warm-up) and saves and samples its "
            "averaged weights. adafactor (transformers) keeps factored second moments, the least memory."))
    weight_decay: float = Field(1e-2, ge=0.0, le=10.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        None, description="Default (0.9, 0.999) for AdamW, Prodigy and schedule-free AdamW, (0.9, 0.99) for Lion.")
    eps: float = Field(1e-8, gt=0, le=1.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD only.")
    min_8bit_size: int = Field(
        4096, ge=1, le=2**31 - 1,
        description="8-bit optimizers keep tensors smaller than this in 32-bit (bitsandbytes' default).")
    d_coef: float = Field(1.0, gt=0.0, le=100.0, description=(
        "prodigy: multiplies the step size it estimates; the knob to turn, rather than the learning rate "
        "(0.5-2 are typical: 2 learns faster, 0.5 if samples overcook)."))
    use_bias_correction: bool = Field(False, description=(
        "prodigy: Adam's bias correction, which damps the first steps like a warm-up; the setting kohya "
        "users share turns it on, with safeguard_warmup."))
    safeguard_warmup: bool = Field(False, description=(
        "prodigy: keep the learning rate out of the step-size estimate, so damped first steps (bias "
        "correction) do not inflate it; on with use_bias_correction."))
    r: float = Field(0.0, ge=0.0, le=10.0, description=(
        "adamw_schedulefree: weight step k by k^r in the average it samples and saves; 0 (the default) "
        "weighs every step after the warm-up alike."))
    relative_step: bool = Field(False, description=(
        "adafactor: its own rate, min(0.01, 1/sqrt(step)), instead of training.learning_rate (and of "
        "per-group rates, unused then); needs training.lr_scheduler constant. false, as kohya's common setting: "
        "training.learning_rate and its scheduler."))
    scale_parameter: bool = Field(False, description=(
        "adafactor: scale each step by its weight's size (RMS); off in kohya's common setting (a LoRA's up "
        "matrix starts at zero, so its steps would start tiny)."))
    warmup_init: bool = Field(False, description="adafactor with relative_step: its rate grows from 1e-6 per step.")

    @model_validator(mode="after")
    def _own_options(self):
        # Only a value other than the default: a run's recipe.yaml spells every default out.
        for key, kind in OPTIMIZER_OWN_OPTIONS.items():
            if self.type != kind and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"{key}: an option of optimizer.type {kind}, and this recipe's is {self.type}")
        if self.warmup_init and not self.relative_step:
            raise ValueError("warmup_init: warms up Adafactor's own rate, so it needs relative_step: true")
        return self


KEEP_BEST_METRICS = ("val_loss", "clip_score", "clip_i", "dino")


class EarlyStoppingConfig(Section):
    metric: Literal[KEEP_BEST_METRICS] = Field("val_loss", description=(
        "val_loss (held-out images), or one of validation.metrics: clip_score, clip_i, dino."))
    patience: int = Field(3, ge=1, le=MAX_STEPS, description="Validations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, le=1e6, description=(
        "What counts as an improvement: a change by more, in the metric's better direction."))


class EmaConfig(Section):
    """An exponential moving average of the trained weights (diffusers' EMAModel), written beside the
    trained files into `ema/` (finetune/train/ema.py)."""

    decay: float = Field(0.9999, gt=0.0, lt=1.0, description=(
        "The most the average keeps per update. Until it is reached the decay ramps as (1+n)/(10+n) with the "
        "n-th update, which reaches 0.999 only after ~9,000 updates, so a run of a few thousand steps averages "
        "roughly its last fifth whatever this says: 0.9999 (diffusers' default) suits long full fine-tunes; "
        "0.995-0.999 caps a LoRA run's average at its last ~200-1,000 updates."))
    update_every: int = Field(1, ge=1, le=MAX_STEPS, description=(
        "Optimizer steps between EMA updates; decay and warm-up count updates. 5-10 on big models, where an "
        "update is a pass over every trained weight."))
    update_after_step: int = Field(0, ge=0, le=MAX_STEPS, description=(
        "Updates that only copy the weights before averaging starts (diffusers' update_after_step)."))
    warmup_power: float | None = Field(None, gt=0.0, le=1.0, description=(
        "null: the (1+n)/(10+n) ramp; a power p: 1-(1+n)^-p instead (diffusers' use_ema_warmup: 2/3 for runs "
        "of a million steps, 3/4 for shorter ones)."))
    validate_with: Literal["raw", "ema", "both"] = Field("raw", description=(
        "Weights the validation prompts are sampled with: raw (the trained ones), ema, or both (the EMA's "
        "samples in samples/step-N/ema/; metrics and the model card use the raw ones)."))
    device: Literal["accelerator", "cpu"] = Field("accelerator", description=(
        "Where the average is kept: cpu keeps it off the GPU (a full SDXL fine-tune's is 10 GB in fp32) and "
        "brings it over for each update, into the room the freed gradients leave."))


class TrainingConfig(Section):
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps; set this or epochs.")
    epochs: int | None = Field(None, ge=1, le=100_000)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH)
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_BATCH)
    learning_rate: float = Field(1e-4, gt=0, le=MAX_LR)
    scale_lr: bool = Field(False, description=(
        "Multiply every learning rate by the global batch (batch_size x processes x accumulation), as the "
        "diffusers examples' --scale_lr; off: rates are used as written on any number of processes."))
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine",
                          "cosine_with_restarts", "polynomial"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description=(
        "auto: bf16 on a GPU that has it (Ampere or newer, Apple MPS), fp16 on older CUDA GPUs, no (fp32) on "
        "a CPU; the choice is written into the run's recipe.yaml."))
    gradient_checkpointing: bool = False
    seed: Seed = 42
    min_snr_gamma: float | None = Field(None, gt=0, le=1000.0,
                                        description="Min-SNR loss weighting; 5.0 is the paper's value.")
    noise_offset: float = Field(0.0, ge=0.0, le=1.0, description="0.05-0.1 helps very dark/bright images.")
    max_grad_norm: float | None = Field(1.0, gt=0)
    log_every_n_steps: int = Field(1, ge=1, le=MAX_STEPS)
    on_nan: Literal["stop", "skip"] = Field("stop", description=(
        "A NaN/inf loss: stop the run (naming the step and the batch's files), or skip that batch and go on; "
        "more than max_skipped_in_a_row skipped in a row stops the run anyway."))
    max_skipped_in_a_row: int = Field(10, ge=1, le=MAX_STEPS)
    early_stopping: EarlyStoppingConfig | None = Field(None, description=(
        "Stop after `patience` validations without the held-out val_loss improving by more than min_delta, "
        "with a checkpoint and the final files; null: off."))
    ema: EmaConfig | None = Field(None, description=(
        "Also keep an exponential moving average of the trained weights and write the method's files with it "
        "into ema/ (and each checkpoint's ema/); {} for the defaults, null: off."))

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        # YAML 1.1 reads a bare `no` as false; it plainly means "no mixed precision".
        return "no" if v is False else v

    @model_validator(mode="after")
    def _length(self):
        if self.max_steps is None and self.epochs is None:
            self.max_steps = 1000
        return self


class MemoryConfig(Section):
    """What the run keeps in GPU memory, and what it trades for less. Each option in effect is logged with
    what it saved; `finetune plan RECIPE` shows what each would save before a run."""

    text_encoders: Literal["auto", "keep", "offload"] = Field("auto", description=(
        "offload: move the text encoders to the CPU once their outputs are cached (T5-XXL alone is 9.5 GB "
        "in bf16); they come back for validation prompts only. auto = offload when cached, on a GPU."))
    vae: Literal["auto", "keep", "offload"] = Field("auto", description=(
        "offload: move the VAE to the CPU once latents are cached; it comes back to decode samples. "
        "auto = offload when cached, on a GPU."))
    quantize_base: Literal["none", "int8", "nf4", "torchao-int8"] = Field("none", description=(
        "Load the frozen denoiser quantized (QLoRA style): int8/nf4 through bitsandbytes (a CUDA GPU), "
        "torchao-int8 weight-only through torchao (any device). LoRA and textual inversion only."))
    fp8_base: bool = Field(False, description=(
        "Store the frozen denoiser's linear and conv weights in float8 (e4m3) and compute in the mixed "
        "precision: half the bytes of bf16 weights. Needs mixed precision and gradient checkpointing "
        "(without it every layer's upcast copy is kept for the backward pass)."))
    offload_blocks: int = Field(0, ge=0, le=1000, description=(
        "Keep the frozen weights of this many of the denoiser's repeated blocks (FLUX.1: 19 double- and 38 "
        "single-stream blocks; the UNets' transformer blocks) in CPU memory; each visits the GPU only while "
        "it runs, forward and backward (kohya's blocks_to_swap). Slower by the transfers; one process only."))
    cache_dir: str | None = Field(None, description=(
        "Folder for latents and text-encoder outputs on disk, keyed by the images' content and the "
        "settings that made them, reused by later runs of the same data; read back one batch at a time, "
        "so host RAM holds none of them. Unset: cached in memory for this run only."))
    tf32: bool = Field(True, description=(
        "TF32 matmuls and convolutions for fp32 work on Ampere or newer GPUs (about 10-bit mantissa, "
        "several times faster); no effect elsewhere."))
    attention: Literal["sdpa", "flash", "sage"] = Field("sdpa", description=(
        "Attention kernel: sdpa = PyTorch's scaled_dot_product_attention (flash or memory-efficient "
        "kernels chosen by PyTorch); flash/sage = diffusers' flash-attn or SageAttention backends, "
        "which need their packages and a CUDA GPU."))
    compile: bool = Field(False, description=(
        "torch.compile the denoiser's repeated blocks (diffusers' regional compilation): faster steps "
        "after a warm-up of a minute or more."))


class PriorPreservationConfig(Section):
    """DreamBooth's prior preservation: images of the subject's class, made by the base model, train
    alongside the subject so the class word keeps its meaning ("a dog" stays any dog)."""

    enabled: bool = False
    class_prompt: str | None = Field(None, description="The class without the identifier, e.g. 'a photo of a dog'.")
    class_data_dir: str | None = Field(
        None, description="Folder of class images; missing ones are generated into it and reused next time.")
    num_class_images: int = Field(100, ge=1, le=100_000, description="100-200 per subject is usual.")
    prior_loss_weight: float = Field(1.0, ge=0.0, le=100.0,
                                     description="Weight of the class loss; users report 0.2-1.0.")
    sample_batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="Batch size when generating class images.")
    num_inference_steps: int = Field(25, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE)
    negative_prompt: str | None = None
    seed: Seed = 0

    @model_validator(mode="after")
    def _needs_prompt(self):
        if self.enabled and not self.class_prompt:
            raise ValueError("class_prompt: required when prior preservation is enabled (e.g. 'a photo of a dog')")
        if self.enabled and not self.class_data_dir:
            raise ValueError("class_data_dir: required when prior preservation is enabled (a folder; it may be empty)")
        return self


# What `validation.metrics` may measure at each validation step (finetune/eval/measure.py); the eval-only
# ones (prior drift, FD/FID/KID) need base images or many images and are `finetune eval`'s.
TRAINING_METRICS = ("clip_score", "clip_i", "dino", "diversity")
# Those a checkpoint can be kept or a run stopped by, and whether higher is better.
HIGHER_IS_BETTER = {"val_loss": False, "clip_score": True, "clip_i": True, "dino": True}


class MetricModelsConfig(Section):
    """The models metrics are computed with: hub ids (downloaded once into the Hugging Face cache),
    local folders, or builtin:tiny-clip / builtin:tiny-dinov2 (tests, the quickstart)."""

    clip: str = Field("openai/clip-vit-large-patch14", description="CLIP for clip_score and clip_i.")
    dino: str = Field("facebook/dinov2-large", description="DINOv2 for dino, diversity, FD-DINOv2 and KID.")
    inception: bool = Field(False, description=(
        "Also Inception FID/KID (needs torch-fidelity, whose Inception weights are a pickled .pth file: off "
        "unless asked for; FD-DINOv2 is reported either way)."))


class ValidationConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="May use the trigger word.")
    negative_prompt: str | None = None
    every_n_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                      description="Also always sampled at the end when prompts are given.")
    images_per_prompt: int = Field(1, ge=1, le=100)
    seed: Seed = 0
    num_inference_steps: int = Field(25, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE)
    width: int | None = Field(None, ge=64, le=MAX_SIDE)
    height: int | None = Field(None, ge=64, le=MAX_SIDE)
    metrics: list[Literal[TRAINING_METRICS]] = Field(default_factory=list, description=(
        "Measured on each validation's samples and logged to metrics.jsonl: clip_score (image vs prompt), "
        "clip_i and dino (similarity to the training images), diversity (mean pairwise DINO distance)."))
    metric_models: MetricModelsConfig = Field(default_factory=MetricModelsConfig)


class OutputConfig(Section):
    run_name: str | None = Field(None, description="Folder name under output.dir; default: recipe name + time.")
    dir: str = "outputs"
    save_every_n_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    keep_best: Literal[KEEP_BEST_METRICS] | None = Field(None, description=(
        "Also keep the checkpoint with the best value of this metric (the lowest held-out val_loss, or the highest "
        "clip_score, clip_i or dino of validation.metrics), named in checkpoints/best.json, whatever "
        "keep_last_checkpoints says; the final files stay the last step's."))
    keep_last_checkpoints: int | None = Field(
        None, ge=1, le=10_000,
        description="Keep only the newest N checkpoints; older ones are deleted after a new one is complete.")
    formats: list[Literal["diffusers", "kohya"]] = Field(
        default_factory=lambda: ["diffusers", "kohya"], min_length=1,
        description="Adapter files to write; at least one, or the run would keep nothing.")
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    trigger_words: list[str] = Field(default_factory=list, description="Listed in the model card.")
    trackers: list[str] = Field(default_factory=list, description=(
        "Experiment trackers accelerate supports (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, "
        "swanlab, trackio), given every metrics.jsonl row; checked before loading (finetune/train/tracking.py)."))
    hooks: list[dict] | None = Field(
        None, description="Output hooks every emitted image passes through, in order, e.g. "
                          "[{type: watermark}, {type: provenance}, {type: prompt_filter, block: [...]}]; "
                          "unset: the defaults; [] turns them all off (logged).")

    @field_validator("hooks")
    @classmethod
    def _known_hooks(cls, v):
        if v is None:
            return v
        from ..hooks import validate_hook_configs

        return validate_hook_configs(v)

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, v):
        if v is not None and (not v or "/" in v or "\\" in v or v in (".", "..") or v.startswith(".")):
            raise ValueError("a run name is one folder name: no '/', '\\' or leading '.'")
        return v


class Recipe(Section):
    description: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: MethodConfig = Field(default_factory=lambda: {"type": "lora"}, validate_default=True)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    prior_preservation: PriorPreservationConfig = Field(default_factory=PriorPreservationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        multiple = 8
        for key in ("width", "height"):
            v = getattr(self.validation, key)
            if v is not None and v % multiple:
                raise ValueError(f"validation.{key}: {v} is not a multiple of {multiple}")
        mem, tr = self.memory, self.training
        if hasattr(self.method, "variant") and (mem.fp8_base or mem.quantize_base != "none"):
            from ..methods.adapters import features

            for _, key in features(self.method):
                raise ValueError(f"{key}: not with a float8 or quantized base (memory.fp8_base, memory.quantize_base) "
                                 "yet: DoRA reads the base weight's norm and LoHa/LoKr build a full delta, neither "
                                 "checked on those layers; use a plain LoRA there")
        if getattr(self.method, "variant", None) == "loha" and "kohya" not in self.output.formats:
            raise ValueError("output.formats: diffusers has no LoHa loader, so only the kohya file is written; "
                             "add kohya")
        held = self.data.validation_split > 0 or self.data.validation_path
        if self.data.validation_split > 0 and self.data.validation_path:
            raise ValueError("data.validation_path: set it or data.validation_split, not both")
        for key, metric in (("output.keep_best", self.output.keep_best),
                            ("training.early_stopping.metric", tr.early_stopping and tr.early_stopping.metric)):
            self._check_measured(key, metric, held)
        if mem.fp8_base and mem.quantize_base != "none":
            raise ValueError(f"memory.fp8_base: cannot also quantize the base (memory.quantize_base="
                             f"{mem.quantize_base}); choose one")
        if mem.offload_blocks and mem.quantize_base != "none":
            raise ValueError(f"memory.offload_blocks: cannot move quantized weights (memory.quantize_base="
                             f"{mem.quantize_base}); choose one")
        if mem.fp8_base and tr.mixed_precision == "no":
            raise ValueError("memory.fp8_base: needs training.mixed_precision auto, bf16 or fp16 (float8 "
                             "weights are computed in the mixed precision)")
        if mem.fp8_base and not tr.gradient_checkpointing:
            raise ValueError("memory.fp8_base: needs training.gradient_checkpointing: true; without it every "
                             "layer's upcast copy stays for the backward pass and the run takes more memory, not less")
        from .optimizer_rules import optimizer_problem

        if why := optimizer_problem(self):
            raise ValueError(why)
        return self

    def _check_measured(self, key: str, metric: str | None, held: bool) -> None:
        """`key` decides by `metric`: it must be measured, at validation steps."""
        v = self.validation
        if metric is None:
            return
        if metric == "val_loss" and not (held and v.every_n_steps):
            raise ValueError(f"{key}: val_loss needs held-out images (data.validation_split or "
                             "data.validation_path) and validation.every_n_steps, when it is measured")
        if metric != "val_loss" and not (metric in v.metrics and v.prompts and v.every_n_steps):
            raise ValueError(f"{key}: {metric} needs validation.metrics to include it, validation.prompts and "
                             "validation.every_n_steps, when it is measured")
