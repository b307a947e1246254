"""Pipeline components built on the meta device from their configs: every module and parameter
shape, no weights, no memory.

Deep models repeat one block many times (FLUX.1: 19 + 38 transformer blocks; SDXL: 10 per
transformer; OpenCLIP bigG: 32 layers). Tracing every copy costs seconds each, so runs of
identical blocks are cut to their first three (`cut_repeats`), and counts and activation peaks of the
missing blocks are added back from the last ones: blocks with the same shapes take the same
memory. The tests check the extrapolated counts against full builds.
"""

from __future__ import annotations

from typing import Callable

import torch

from .trace import Repeat

KEEP = 3  # blocks kept of each run: the growth is measured from the second to the third (trace.Repeat)
# Models are traced in the dtype they compute in; bf16 and fp16 take the same bytes, so one trace serves both.
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.float16}


def build(spec, name: str, dtype: torch.dtype | None = None) -> torch.nn.Module | None:
    """Component `name` of the model `spec` describes, on the meta device (buffers too), in `dtype`
    (floating-point tensors only; None: as its config builds it, float32). None if it has none."""
    from ..families.base import meta_component

    model = meta_component(spec.source, spec.index, name, spec.revision)
    if model is None:
        return None
    # nn.Module.to, not diffusers' override: that one warns about modules it would keep in fp32.
    torch.nn.Module.to(model, device="meta", dtype=dtype)
    model.requires_grad_(False)
    return model


def cut_repeats(model: torch.nn.Module, keep: int = KEEP) -> list[Repeat]:
    """Shorten every run of more than `keep` identical stacked blocks (transformer blocks of the same
    type and parameter shapes) to `keep`, in place; the outermost runs only."""
    runs: list[tuple[str, torch.nn.ModuleList]] = []
    for parent_name, parent in model.named_modules():
        lists = [(n, m) for n, m in parent.named_children() if isinstance(m, torch.nn.ModuleList)]
        for child, blocks in lists:
            name = f"{parent_name}.{child}".lstrip(".")
            inside = any(name.startswith(outer + ".") for outer, _ in runs)
            # A list as long as a sibling list is walked in step with it: cutting one alone would
            # break the model.
            zipped = any(len(other) == len(blocks) for n, other in lists if n != child)
            if not inside and not zipped and len(blocks) > keep and _stack(blocks):
                runs.append((name, blocks))
    repeats = []
    for _, blocks in runs:
        full = len(blocks)
        del blocks[keep:]
        repeats.append(Repeat(blocks=blocks, full=full, kept=keep))
    return repeats


# Blocks that map hidden states to hidden states of the same shape, one after the other. Not every
# run of identical blocks does: the ResNet blocks of a UNet up block each take one skip connection.
STACKED = ("TransformerBlock", "EncoderLayer", "DecoderLayer", "T5Block")


def _stack(blocks: torch.nn.ModuleList) -> bool:
    return type(blocks[0]).__name__.endswith(STACKED) and _identical(blocks)


def _identical(blocks: torch.nn.ModuleList) -> bool:
    def signature(block):
        return type(block), [(n, tuple(p.shape)) for n, p in block.named_parameters()]

    first = signature(blocks[0])
    return all(signature(b) == first for b in blocks)


def count(model: torch.nn.Module, repeats: list[Repeat],
          keep: Callable[[str, torch.nn.Parameter], bool] = lambda n, p: True) -> int:
    """Parameters of the full model that `keep(name, param)` selects, counted on its cut-down copy."""
    total = sum(p.numel() for n, p in model.named_parameters() if keep(n, p))
    for r in repeats:
        total += (r.full - r.kept) * sum(p.numel() for n, p in r.sample.named_parameters() if keep(n, p))
    return total


def numels(model: torch.nn.Module, repeats: list[Repeat], keep: Callable) -> list[int]:
    """The sizes of the selected parameter tensors of the full model (8-bit optimizers keep small
    tensors in 32 bits, so sizes matter, not only their sum)."""
    sizes = [p.numel() for n, p in model.named_parameters() if keep(n, p)]
    for r in repeats:
        sizes += [p.numel() for n, p in r.sample.named_parameters() if keep(n, p)] * (r.full - r.kept)
    return sizes
