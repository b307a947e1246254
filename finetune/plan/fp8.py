"""`memory.fp8_base` on a meta model: the frozen denoiser's weights stored in float8 by training's own
rule (finetune/train/memory.py `store_fp8`: Linear and conv weights, minus the modules diffusers'
layerwise casting leaves alone), so the planner counts exactly the weights a run stores in fp8.

In training, autocast upcasts each fp8 weight to the compute dtype for its op: a new tensor that the
backward pass keeps (with gradient checkpointing, only the block being recomputed holds its copies).
The meta device has no autocast and its kernels take mixed dtypes, so the trace would see no copy;
`store_in_fp8` gives each fp8 layer a forward that makes the copy the same way, above autograd, where
the backward pass saves it as it saves autocast's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn


def store_in_fp8(model: torch.nn.Module) -> None:
    """`model`'s frozen weights in fp8 as a training run stores them, each upcast when its layer runs."""
    from ..train.memory import store_fp8

    store_fp8(model)
    for module in model.modules():
        weight = module._parameters.get("weight")  # its own: a LoRA wrapper only forwards its base layer's
        if weight is not None and weight.dtype == FP8:
            module.forward = functools.partial(_upcast_forward, module)


def _upcast_forward(module, x, *args, **kwargs):
    weight = module.weight.to(x.dtype)  # autocast's cast: a copy in the compute dtype
    if isinstance(module, torch.nn.Linear):
        return F.linear(x, weight, module.bias)
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return module._conv_forward(x, weight, module.bias)
    from ..errors import FinetuneError

    raise FinetuneError(f"memory.fp8_base: plan cannot trace a {type(module).__name__} stored in fp8 yet")
