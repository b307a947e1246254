"""Activation memory measured by running a model on the meta device, where tensors have shapes and
dtypes but no data: every tensor an operation creates is counted while it is alive, so the peak of
one forward + backward pass is the peak of the activations (and of the transient buffers the
backward pass makes), without computing anything and without a GPU.

Two things differ from a GPU run and are handled here:
- On the meta device PyTorch's attention falls back to the "math" kernel, which builds the full
  tokens x tokens attention matrix; CUDA runs flash / memory-efficient attention, which keeps only
  the output and a log-sum-exp per row. `flash_attention()` swaps in a stand-in with that footprint.
- Parameters, buffers and inputs exist before the trace; views of them (a transposed weight saved
  for backward) share their storage and must not count as new memory (`external`).

Gradients of trained parameters are not activations: they are taken out of the count as they are
accumulated (the estimate lists them on their own line).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage created under it until that storage is freed."""

    def __init__(self, external=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}
        # Storages that existed before (weights, inputs): their views are free.
        self._external = {t.untyped_storage()._cdata for t in external}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _shortcut(func, args, kwargs)
        if out is None:
            out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._alive or key in self._external:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        # A weak reference is called back when the storage dies: that is when its memory is free.
        self._alive[key] = weakref.ref(storage, functools.partial(self._freed, key, size))

    def _freed(self, key: int, size: int, _ref) -> None:
        if self._alive.pop(key, None) is not None:
            self.live -= size

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop counting `tensor` (a parameter's gradient: listed apart from the activations)."""
        storage = tensor.untyped_storage()
        if self._alive.pop(storage._cdata, None) is not None:
            self.live -= storage.nbytes()


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _elementwise(args):
    a, b = args[0], args[1]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_contiguous() and b.is_contiguous()):
        return None  # other layouts keep theirs through an elementwise op: torch's own rules decide
    return _meta(torch.broadcast_shapes(a.shape, b.shape), torch.result_type(a, b))


def _layer_norm(args):
    x, shape = args[0], args[1]
    stats = x.shape[:x.dim() - len(shape)] + (1,) * len(shape)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # CUDA keeps stats in fp32
    return _meta(x.shape, x.dtype), _meta(stats, acc), _meta(stats, acc)


def _grads(like, mask):
    return tuple(_meta(t.shape, t.dtype) if want and t is not None else None for t, want in zip(like, mask))


# Operations whose output shapes are plain, answered here: torch's meta kernels for them are written in
# Python and took most of a trace's time (a group norm ~3 ms, its backward ~7 ms); nothing is computed
# either way, and the results have the shapes, dtypes and contiguous layout CUDA gives them.
_SHORTCUTS = {
    torch.ops.aten.add.Tensor: _elementwise,
    torch.ops.aten.mul.Tensor: _elementwise,
    torch.ops.aten.div.Tensor: _elementwise,
    torch.ops.aten.mm.default: lambda a: _meta((a[0].shape[0], a[1].shape[1]), a[0].dtype),
    torch.ops.aten.addmm.default: lambda a: _meta((a[1].shape[0], a[2].shape[1]), a[1].dtype),
    torch.ops.aten.native_layer_norm.default: _layer_norm,
    torch.ops.aten.native_layer_norm_backward.default: lambda a: _grads((a[1], a[5], a[6]), a[7]),
    torch.ops.aten.native_group_norm.default: lambda a: (_meta(a[0].shape, a[0].dtype),
                                                        _meta((a[3], a[6]), a[0].dtype), _meta((a[3], a[6]), a[0].dtype)),
    torch.ops.aten.native_group_norm_backward.default: lambda a: _grads((a[1], a[4], a[4]), a[9]),
}


def _shortcut(func, args, kwargs):
    rule = _SHORTCUTS.get(func)
    if rule is None or kwargs or not all(t.device.type == "meta" for t in args if isinstance(t, torch.Tensor)):
        return None
    return rule(args)


class _FlashAttention(torch.autograd.Function):
    """Shapes and saved tensors of flash / memory-efficient attention: the output and one fp32
    log-sum-exp per query row are kept for backward, never the attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # The keyword names are torch's: diffusers' dispatcher calls it with query=, key=, value=.
    return _FlashAttention.apply(query, key, value)


@contextlib.contextmanager
def flash_attention():
    """`F.scaled_dot_product_attention` replaced by the flash-like stand-in while tracing. Models
    look the function up on `torch.nn.functional` at call time, so patching the module suffices."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention
    functional.scaled_dot_product_attention = _attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


@dataclass
class Repeat:
    """A run of identical blocks cut down to its first `kept` for tracing. The memory the run gains
    per block is measured between the starts of the last two kept blocks: one whole period, the
    previous block's inputs already freed if nothing saved them. `sample`, the last kept block,
    already sees gradients flowing in, as every later block does."""

    blocks: torch.nn.ModuleList
    full: int
    kept: int

    @property
    def sample(self) -> torch.nn.Module:
        return self.blocks[self.kept - 1]


def measure(run, *, external, trained=(), repeats=(), backward=True) -> int:
    """Peak bytes of activations while `run()` (which returns the model output) runs and, with
    `backward`, while its gradient flows back. Each cut-down `Repeat` adds (full - kept) times the
    memory its sample block kept alive through the forward pass, as the missing blocks would have."""
    meter = LiveBytes(external)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: meter.forget(p.grad)) for p in trained]
    grown: list[int] = []
    # Only the forward pass: checkpointing runs each block again during backward.
    growth = [h for r in (repeats if backward else ()) for h in _growth_hooks(r, meter, grown)]
    try:
        with flash_attention(), meter:
            out = run()
            for h in growth:
                h.remove()
            if backward:
                out.float().square().mean().backward()
            del out
    finally:
        for h in hooks + growth:
            h.remove()
    return meter.peak + sum(grown)


def _growth_hooks(r: Repeat, meter: LiveBytes, grown: list[int]):
    start: list[int] = []

    def first(module, args):
        start.append(meter.live)

    def second(module, args):
        # What one block leaves alive for backward (all it saved; with checkpointing, its output).
        grown.append((r.full - r.kept) * max(0, meter.live - start.pop()))

    return [r.blocks[r.kept - 2].register_forward_pre_hook(first), r.sample.register_forward_pre_hook(second)]
