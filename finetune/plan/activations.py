"""Activation peaks of the phases of a run, traced on the meta device (`trace.py`) with the inputs the
training loop and the sampling pipelines give each model: one training step of the denoiser (and of
the text encoders that train), the VAE encoding images for the latent cache, and validation samples
(the denoiser without gradients, the VAE decoding). Traced at batch 1 and scaled by the batch:
activations grow in proportion to it (the tests check it).

`Tracer` keeps every trace it made, so the proposals of `plan --vram` (which change one setting at a
time) trace only what changed.
"""

from __future__ import annotations

import functools

import torch

from . import meta
from .method import MethodPlan, apply
from .trace import measure

CLIP_TOKENS = 77  # a text encoder's sequence when its config names none


def _empty(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def denoiser_inputs(family, model, batch: int, latent: tuple[int, int], dtype, text_grad: bool) -> dict:
    """Keyword arguments of one denoiser call as `family` makes it (its `plan_denoiser_inputs`)."""
    return family.plan_denoiser_inputs(model.config, batch, latent, dtype, text_grad, _empty)


def _checkpointing(model, on: bool) -> None:
    # As the training loop enables it, without saving RNG states (there is no RNG on the meta device).
    from torch.utils.checkpoint import checkpoint

    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        if on:
            model.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=False,
                                                                  preserve_rng_state=False))
        elif model.is_gradient_checkpointing:
            model.disable_gradient_checkpointing()
    else:  # transformers; releases from 5.2x call it activation checkpointing and warn on the old names
        prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
        if on:
            getattr(model, f"{prefix}_checkpointing_enable")({"use_reentrant": False, "preserve_rng_state": False})
        elif getattr(model, f"is_{prefix}_checkpointing"):
            getattr(model, f"{prefix}_checkpointing_disable")()


def _inputs_of(model) -> list:
    return [*model.parameters(), *model.buffers()]


class Tracer:
    """Traces of one model's components, each made once (keyed by everything that changes it)."""

    def __init__(self, spec):
        from ..families.base import model_file, read_json

        self.spec = spec
        self.family = spec.family
        self._done: dict[tuple, object] = {}
        vae = read_json(model_file(spec.source, "vae/config.json", spec.revision)) or {}
        self.vae_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        self.latent_channels = vae.get("latent_channels", 4)
        self.denoiser = read_json(model_file(spec.source, f"{self.family.denoiser_component}/config.json",
                                             spec.revision)) or {}

    def _cached(self, key: tuple, make):
        if key not in self._done:
            self._done[key] = make()
        return self._done[key]

    def latent(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] // self.vae_scale, size[1] // self.vae_scale

    def cache_bytes_per_image(self, size: tuple[int, int], weight_bytes: int, latents: bool, text: bool) -> int:
        """Host RAM the caches take per training image: its latent and its caption's text embeddings
        (the family's `text_tokens` at the denoiser's context width), each if cached."""
        h, w = self.latent(size)
        latent = self.latent_channels * h * w * weight_bytes if latents else 0
        tokens = self.family.text_tokens
        width = self.denoiser.get("joint_attention_dim") or self.denoiser.get("cross_attention_dim")
        width = width if isinstance(width, int) else 768  # a per-block list in some UNets
        return latent + (tokens * width * weight_bytes if text else 0)

    def model(self, name: str, mp: MethodPlan, dtype, fp8: bool = False) -> tuple[torch.nn.Module, list]:
        """Component `name` on the meta device in `dtype`, its repeats cut, the method applied (and
        with `fp8` its frozen weights stored in fp8); built once and shared by the counts and every
        trace of it."""
        def make():
            from .counts import text_encoder_names
            from .method import trained_encoders

            model = meta.build(self.spec, name, dtype)
            if model is None:
                from ..errors import FinetuneError

                raise FinetuneError(f"model.base: cannot build the {name} of {self.spec.label} from its config "
                                    "(no config.json, or a class diffusers/transformers do not have)")
            if name == self.family.denoiser_component:
                self.family.denoiser_built(model)
            repeats = meta.cut_repeats(model)
            apply(mp, self.family, name, model, trained_encoders(mp, self.family, text_encoder_names(self.spec)))
            if fp8:
                from .fp8 import store_in_fp8

                store_in_fp8(model)
            return model, repeats
        return self._cached(("model", name, mp, dtype, fp8), make)

    def counts(self, mp: MethodPlan, dtype) -> dict:
        from .counts import count_components

        return self._cached(("counts", mp, dtype), lambda: count_components(self, mp, dtype))

    def fp8_weights(self, mp: MethodPlan, dtype) -> int:
        """Weights of the denoiser that `memory.fp8_base` stores in fp8 (`fp8.py`)."""
        from .fp8 import FP8

        def make():
            model, repeats = self.model(self.family.denoiser_component, mp, dtype, fp8=True)
            return meta.count(model, repeats, lambda n, p: p.dtype == FP8)
        return self._cached(("fp8", mp, dtype), make)

    def block_bytes(self, mp: MethodPlan, dtype, fp8: bool) -> list[int]:
        """Bytes of the frozen weights of each of the denoiser's repeated blocks (diffusers'
        `_repeated_blocks`), in the order finetune/train/block_swap.py parks them, cut blocks included."""
        def make():
            model, repeats = self.model(self.family.denoiser_component, mp, dtype, fp8)
            names = set(getattr(model, "_repeated_blocks", None) or ())
            last = {id(r.sample): r.full - r.kept for r in repeats}  # a cut run's missing blocks follow it
            out = []
            for m in model.modules():
                if type(m).__name__ in names:
                    size = sum(p.numel() * p.element_size() for p in m.parameters() if not p.requires_grad)
                    out += [size] * (1 + last.get(id(m), 0))
            return out
        return self._cached(("blocks", mp, dtype, fp8), make)

    def denoiser_step(self, mp: MethodPlan, dtype, checkpointing: bool, size, text_grad: bool,
                      fp8: bool = False) -> int:
        """Peak activation bytes of one training step of the denoiser, batch 1 (with `fp8`, the
        weights' upcast copies it keeps included)."""
        def make():
            model, repeats = self.model(self.family.denoiser_component, mp, dtype, fp8)
            kwargs = denoiser_inputs(self.family, model, 1, self.latent(size), dtype, text_grad)
            return _step(model, repeats, checkpointing, lambda: model(**kwargs, return_dict=False)[0], _flat(kwargs))
        return self._cached(("step", mp, dtype, checkpointing, size, text_grad, fp8), make)

    def text_step(self, mp: MethodPlan, name: str, dtype, checkpointing: bool) -> int:
        """Peak activation bytes of a text encoder that trains, one caption (batch 1)."""
        def make():
            model, repeats = self.model(name, mp, dtype)
            tokens = getattr(model.config, "max_position_embeddings", CLIP_TOKENS)
            ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
            return _step(model, repeats, checkpointing, lambda: model(input_ids=ids, output_hidden_states=True)[0],
                         [ids])
        return self._cached(("text", mp, name, dtype, checkpointing), make)

    def denoiser_sample(self, mp: MethodPlan, dtype, size, fp8: bool = False) -> int:
        """Peak activation bytes of one denoiser call without gradients (sampling), batch 1."""
        def make():
            model, _ = self.model(self.family.denoiser_component, mp, dtype, fp8)
            model.eval()
            kwargs = denoiser_inputs(self.family, model, 1, self.latent(size), dtype, False)
            with torch.no_grad():  # nothing accumulates block after block: no repeats to add back
                return measure(lambda: model(**kwargs, return_dict=False)[0],
                               external=_inputs_of(model) + _flat(kwargs), backward=False)
        return self._cached(("sample", mp, dtype, size, fp8), make)

    def vae(self, direction: str, size) -> int:
        """Peak bytes of the VAE encoding ("encode") or decoding ("decode") one image, in fp32."""
        return self._cached(("vae", direction, size), lambda: self._vae(direction, size))

    def _vae(self, direction: str, size) -> int:
        vae = self._cached(("vae",), lambda: meta.build(self.spec, "vae", torch.float32))
        h, w = self.latent(size)
        if direction == "encode":
            x = _empty(1, vae.config.in_channels, size[0], size[1])
            run = lambda: vae.encode(x).latent_dist.sample()  # noqa: E731
        else:
            x = _empty(1, self.latent_channels, h, w)
            run = lambda: vae.decode(x, return_dict=False)[0]  # noqa: E731
        with torch.no_grad():
            return measure(run, external=_inputs_of(vae) + [x], backward=False)


def _step(model, repeats, checkpointing: bool, run, inputs: list) -> int:
    """Peak activations of `run()` and its backward pass through `model` in training mode."""
    _checkpointing(model, checkpointing)
    model.train()  # dropout layers run as in training
    trained = [p for p in model.parameters() if p.requires_grad]
    try:
        return measure(run, external=_inputs_of(model) + inputs, trained=trained, repeats=repeats)
    finally:
        model.zero_grad(set_to_none=True)  # the next trace of this model starts without gradients


def _flat(kwargs: dict) -> list:
    out = []
    for v in kwargs.values():
        out += _flat(v) if isinstance(v, dict) else [v] if isinstance(v, torch.Tensor) else []
    return out
