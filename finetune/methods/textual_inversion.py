"""Textual inversion: learn the embedding of a new token (or of several, for a multi-vector token);
every other weight of the model stays exactly as it was.

Tokens: a placeholder `<my-cat>` with `num_vectors: 3` adds `<my-cat>`, `<my-cat>_1`, `<my-cat>_2`
to the tokenizer, the naming diffusers' textual-inversion example and `load_textual_inversion` use;
training captions say `<my-cat>` and are expanded to all three, as diffusers expands prompts.

Only the new rows learn: a gradient hook zeroes the gradient of every other row of the token
embedding (so clipping and optimizer state see only the new vectors), and `after_step` copies the
original values back into every other row (AdamW's decoupled weight decay moves rows that have no
gradient), so the rest of the text encoder is bit-identical after training.

Which text encoders learn: those the family names in `embedding_keys` (SD1.x: its one CLIP; SDXL:
CLIP-L and OpenCLIP bigG). FLUX.1 learns the token in CLIP-L only: T5 gets no new token and reads
the trigger as ordinary text pieces, as FluxPipeline's T5 does (its `maybe_convert_prompt` finds no
such token in T5's tokenizer). With several vectors the caption is expanded once (`<t> <t>_1 ...`)
and FLUX.1's family gives T5 the unexpanded text (`flux.unexpanded`), as the pipeline does. CLIP-L reaches FLUX.1 only through its pooled output (the modulation vector), so a FLUX
embedding steers less than an SD one; pivotal tuning's LoRA carries the subject. The embedding file
holds `clip_l` alone: FLUX pivotal files in the wild carry `clip_l` and, optionally, `t5` (diffusers'
advanced FLUX trainer), and ComfyUI's CLIP-L tokenizer reads the `clip_l` tensor (`embedding_key`).

Files: `learned_embeds.safetensors` = {placeholder: [num_vectors, dim]} (what diffusers' example
writes and `pipe.load_textual_inversion(folder)` reads), and `<name>.safetensors` =
{"emb_params": [num_vectors, dim]} (the embedding file AUTOMATIC1111/Forge and kohya's scripts use;
webui names the embedding after the file, diffusers needs `token=`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from ..config_base import Section
from ..errors import FinetuneError
from ..prompts import excerpt
from . import register_method
from .base import Method
from .lora import save_dtype

# torch is imported inside the functions that run it: validating a recipe imports every plug-in
# module, and must not pay for torch (seconds, hundreds of MB) when no model is involved.
if TYPE_CHECKING:
    import torch

DIFFUSERS_EMBEDS_NAME = "learned_embeds.safetensors"
WEBUI_KEY = "emb_params"


def diffusers_embeds_name(encoder_index: int) -> str:
    return DIFFUSERS_EMBEDS_NAME if encoder_index == 0 else f"learned_embeds_{encoder_index + 1}.safetensors"


class TextualInversionConfig(Section):
    type: Literal["textual_inversion"] = Field(
        "textual_inversion", description="Learn new token embeddings; the model itself does not change.")
    placeholder_token: str = Field(
        ..., description="The new word to learn, e.g. '<my-cat>': lowercase, no spaces, not already a token. "
                         "Write it in captions and prompts.")
    num_vectors: int = Field(
        1, ge=1, le=75, description="Vectors behind the token: 1 for an object, 2-8 for hard subjects or styles. "
                                    "Each one uses a place in the 75-token prompt.")
    initializer_token: str = Field(
        ..., description="A single-token word close to the concept (e.g. 'robot', 'cat', 'painting'); "
                         "its embedding is where the new vectors start.")
    caption: str | None = Field(
        None, description="Train every image on this one caption (e.g. 'a photo of <my-cat>'), ignoring the "
                          "image set's captions and caption dropout. Unset: the image set's captions, which "
                          "must then contain placeholder_token.")
    learning_rate: float | None = Field(
        None, gt=0, le=10.0, allow_inf_nan=False,
        description="Learning rate of the new vectors; default training.learning_rate "
                    "(5e-4 to 5e-3 is usual).")

    @field_validator("placeholder_token")
    @classmethod
    def _placeholder(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("must not be empty (e.g. '<my-cat>')")
        if any(ch.isspace() for ch in v):
            raise ValueError(f"{v!r} contains a space; use one word such as '<my-cat>'")
        if v != v.lower():
            # CLIP's tokenizer lowercases prompts, so diffusers would not expand a multi-vector
            # token written with capitals (it compares the lowercased text with the token).
            raise ValueError(f"{v!r} has capital letters; the CLIP tokenizer lowercases prompts, use {v.lower()!r}")
        return v

    @field_validator("initializer_token")
    @classmethod
    def _initializer(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty; give a word close to the concept, e.g. 'cat'")
        return v.strip()

    @field_validator("caption")
    @classmethod
    def _caption_has_token(cls, v, info):
        token = info.data.get("placeholder_token")
        if v is not None and token and token.lower() not in v.lower():
            raise ValueError(f"{v!r} does not contain the placeholder {token!r}; the new vectors learn only "
                             f"from captions that use it")
        return v


@register_method("textual_inversion")
class TextualInversionMethod(Method):
    Config = TextualInversionConfig

    @property
    def trains_text_encoder(self) -> bool:
        # The prompts must be encoded with gradients flowing to the embedding: no text caching.
        return True

    @property
    def tokens(self) -> list[str]:
        """The tokens added to the tokenizer: `<t>`, `<t>_1`, ..., one per vector."""
        t = self.cfg.placeholder_token
        return [t] + [f"{t}_{i}" for i in range(1, self.cfg.num_vectors)]

    # ------------------------------------------------------------------------------------------
    # setup

    def setup(self, c) -> list[dict]:
        # One set of new vectors per text encoder the family embeds into (SDXL: CLIP-L and OpenCLIP
        # bigG each learn the token; FLUX.1: CLIP-L only, T5 keeps its vocabulary).
        for module in c.frozen_modules():
            module.requires_grad_(False)
        self.vectors: dict[str, _NewRows] = {}
        extended: set[int] = set()
        for name in self.family.embedding_keys:
            te, tokenizer = c.text_encoders[name], c.tokenizers[name]
            init_id = self._initializer_id(tokenizer)
            if id(tokenizer) not in extended:  # two encoders may share one tokenizer object
                self._add_tokens(tokenizer)
                extended.add(id(tokenizer))
            self.vectors[name] = _NewRows(te, tokenizer.convert_tokens_to_ids(self.tokens), init_id, len(tokenizer))
        lr = self.cfg.learning_rate or self.training.learning_rate
        return [{"params": [v.weight for v in self.vectors.values()], "lr": lr}]

    def _add_tokens(self, tokenizer) -> None:
        taken = [t for t in self.tokens if t in tokenizer.get_vocab()]
        if taken:
            raise FinetuneError(
                f"method.placeholder_token: {taken[0]!r} is already a token of this model's tokenizer; choose a "
                f"new word, e.g. '<{self.cfg.placeholder_token.strip('<>')}-ti>'")
        added = tokenizer.add_tokens(self.tokens)
        if added != len(self.tokens):  # cannot happen after the check above, unless the tokenizer refuses
            raise FinetuneError(f"method.placeholder_token: the tokenizer added {added} of {len(self.tokens)} tokens")

    def _initializer_id(self, tokenizer) -> int:
        word = self.cfg.initializer_token
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise FinetuneError(
                f"method.initializer_token: {word!r} is {len(ids)} tokens for this tokenizer ({' '.join(pieces)}); "
                f"use a word that is a single token (a common short word close to the concept)")
        return ids[0]

    def trainable_modules(self, c) -> list[torch.nn.Module]:
        return [c.text_encoders[n] for n in self.vectors]

    def trainable_parameter_count(self, groups: list[dict]) -> int:
        # Whole embedding matrices are parameters, but only the new rows learn.
        return self.cfg.num_vectors * sum(p.shape[1] for p in groups[0]["params"])

    # ------------------------------------------------------------------------------------------
    # training hooks

    def prepare_caption(self, caption: str) -> str:
        if self.cfg.caption is not None:
            caption = self.cfg.caption
        elif not caption:
            return caption  # caption dropout: an empty caption stays empty
        token = self.cfg.placeholder_token
        if token.lower() not in caption.lower():
            raise FinetuneError(
                f"method.placeholder_token: the training caption {excerpt(caption)} does not contain {token!r}, so the new "
                f"vectors cannot learn from it; set method.caption (e.g. 'a photo of {token}'), or data.instance_prompt "
                f"with data.caption_extension set to one your images do not have")
        if len(self.tokens) == 1:
            return caption
        # `<t>` -> `<t> <t>_1 ...`, as diffusers' pipelines expand prompts; already expanded text is kept.
        expanded = " ".join(self.tokens)
        pattern = re.compile(f"{re.escape(expanded)}|{re.escape(token)}(?!_\\d)", re.IGNORECASE)
        return pattern.sub(expanded, caption)

    def after_step(self, c) -> None:
        for v in self.vectors.values():
            v.restore_others()

    # ------------------------------------------------------------------------------------------
    # saving

    def learned_vectors(self, c, name: str | None = None) -> torch.Tensor:
        """The trained vectors of one text encoder (default: the first), [num_vectors, dim], float32, CPU."""
        return self.vectors[name or next(iter(self.vectors))].learned()

    def save(self, c, folder: Path, output, name: str) -> list[Path]:
        from ..files import atomic_save_safetensors

        folder = Path(folder)
        dtype = save_dtype(output.save_dtype)
        vectors = {n: v.learned().to(dtype).contiguous() for n, v in self.vectors.items()}
        meta = {"placeholder_token": self.cfg.placeholder_token, "num_vectors": str(self.cfg.num_vectors),
                "initializer_token": self.cfg.initializer_token, "family": self.family.name}
        written = []
        if "diffusers" in output.formats:
            # One file per encoder, as diffusers' examples write them: learned_embeds(_2).safetensors.
            for i, (n, vec) in enumerate(vectors.items()):
                path = folder / diffusers_embeds_name(i)
                atomic_save_safetensors(path, {self.cfg.placeholder_token: vec}, {"format": "pt", **meta})
                written.append(path)
        if "kohya" in output.formats:
            # webui/ComfyUI: one file, one tensor per encoder (`emb_params`; SDXL: `clip_l`, `clip_g`).
            keys = self.family.embedding_keys
            path = folder / f"{name}.safetensors"
            atomic_save_safetensors(path, {keys[n]: vec.clone() for n, vec in vectors.items()},
                                    {"format": "pt", "name": name, **meta})
            written.append(path)
        return written

    def describe_file(self, path: Path) -> str:
        token = self.cfg.placeholder_token
        one_encoder = len(self.family.embedding_keys) == 1
        if path.name == DIFFUSERS_EMBEDS_NAME and one_encoder:
            return f"diffusers format: `pipe.load_textual_inversion(run_folder)`, then write `{token}`"
        if path.name.startswith("learned_embeds"):
            # `load_textual_inversion(run_folder)` would fill only the first encoder, and the second
            # tokenizer would read the token as an unknown word.
            encoder = "text_encoder" if path.name == DIFFUSERS_EMBEDS_NAME else "text_encoder_2"
            return f"diffusers format for `{encoder}`; load each file into its own encoder (see the code below)"
        how = "`load_textual_inversion(file, token=...)`" if one_encoder else \
            f"one `load_textual_inversion` call per tensor ({', '.join(self.family.embedding_keys.values())})"
        keys = self.family.embedding_keys
        # FLUX.1: the token reaches CLIP-L alone; say so, or users expect T5 to know it.
        held = ", ".join(f"`{k}`" for k in keys.values())
        only = "" if len(keys) == len(self.family.text_encoder_names) else f", holding {held} only"
        return (f"embedding for {self.family.kohya_apps}{only} (copy into `embeddings/`; the prompt word is "
                f"`{path.stem}`, in ComfyUI `embedding:{path.stem}`); diffusers: {how}")

    def usage(self, pipeline_class, load_base, run_dir, files):
        names = {Path(f).name for f in files}
        if DIFFUSERS_EMBEDS_NAME in names and len(self.vectors) == 1:
            loads = [f"pipe.load_textual_inversion({str(run_dir)!r})"]
        elif DIFFUSERS_EMBEDS_NAME in names:
            loads = [self._load_line(repr(str(Path(run_dir) / diffusers_embeds_name(i))), n)
                     for i, n in enumerate(self.vectors)]
        else:
            webui = next(str(f) for f in files if Path(f).suffix == ".safetensors")
            if len(self.vectors) == 1:
                loads = [f"pipe.load_textual_inversion({webui!r}, token={self.cfg.placeholder_token!r})"]
            else:  # one file holding a tensor per encoder: diffusers takes them one at a time
                keys = self.family.embedding_keys
                loads = ["from safetensors.torch import load_file", f"embedding = load_file({webui!r})",
                         *(self._load_line(f"embedding[{keys[n]!r}]", n) for n in self.vectors)]
        return [*super().usage(pipeline_class, load_base, run_dir, files), *loads]

    def _load_line(self, source: str, encoder: str) -> str:
        tokenizer = encoder.replace("text_encoder", "tokenizer")
        return (f"pipe.load_textual_inversion({source}, token={self.cfg.placeholder_token!r}, "
                f"text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})")


class _NewRows:
    """The new token rows of one text encoder's embedding: initialised from the initializer word;
    gradients reach them alone (a hook zeroes every other row's, so clipping and optimizer state
    see only the new vectors), and `restore_others` copies the original values back into every
    other row after a step (AdamW's decoupled weight decay moves rows that have no gradient)."""

    def __init__(self, te, token_ids: list[int], init_id: int, vocab_size: int):
        import torch

        self.te = te
        # Never shrink (some checkpoints pad the embedding past the tokenizer); the new rows are
        # overwritten below, so skip transformers' mean/covariance initialisation of them.
        rows = te.get_input_embeddings().weight.shape[0]
        if max(token_ids) >= rows:
            te.resize_token_embeddings(max(vocab_size, rows), mean_resizing=False)
        weight = te.get_input_embeddings().weight
        with torch.no_grad():
            weight[token_ids] = weight[init_id].clone()
        weight.requires_grad_(True)
        new = torch.zeros(weight.shape[0], dtype=torch.bool)
        new[token_ids] = True
        self.keep_idx = torch.nonzero(~new).squeeze(1)
        self.original = weight.detach()[self.keep_idx.to(weight.device)].clone()
        self.new_idx = torch.tensor(token_ids)
        weight.register_hook(self._only_new_rows)
        te.get_input_embeddings().register_forward_hook(self._match_encoder_dtype)

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.te.get_input_embeddings().weight

    def _only_new_rows(self, grad: torch.Tensor) -> torch.Tensor:
        # Words next to the placeholder ("a", "photo", the padding token) get gradients too.
        import torch

        idx = self.new_idx.to(grad.device)
        out = torch.zeros_like(grad)
        out[idx] = grad[idx]
        return out

    def _match_encoder_dtype(self, module, args, output):
        # Under mixed precision the loop keeps trained weights in fp32 and the rest of the text
        # encoder in fp16/bf16; hand the encoder embeddings in its own dtype (CPU layer_norm, for
        # one, refuses fp32 input with bf16 weights). A no-op when everything is fp32.
        dtype = next((p.dtype for p in self.te.parameters() if p is not module.weight), output.dtype)
        return output if output.dtype == dtype else output.to(dtype)

    def restore_others(self) -> None:
        import torch

        weight = self.weight
        if self.original.device != weight.device or self.original.dtype != weight.dtype:
            self.original = self.original.to(weight.device, weight.dtype)
        if self.keep_idx.device != weight.device:
            self.keep_idx = self.keep_idx.to(weight.device)
        with torch.no_grad():
            weight.index_copy_(0, self.keep_idx, self.original)

    def learned(self) -> torch.Tensor:
        import torch

        weight = self.weight
        return weight.detach()[self.new_idx.to(weight.device)].to("cpu", torch.float32).clone()
