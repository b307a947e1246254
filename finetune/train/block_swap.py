"""`memory.offload_blocks: N`: the frozen weights of N of the denoiser's repeated blocks live in
(pinned) CPU memory and visit the GPU one block at a time, in the forward pass, in the forward that
gradient checkpointing recomputes, and in the backward pass.

Why not diffusers' group offloading (`enable_group_offload`): its hook moves a group back to the
CPU after every forward, including the forward that checkpointing recomputes inside the backward
pass, and nothing brings it back for the backward ops, which then find the weights they saved on
the CPU. Here a block comes to the GPU before its forward and as soon as the gradient of any of
its outputs exists (before any of its backward ops run), and goes back after a forward outside
the backward pass and once the gradients of all its inputs are computed (its backward is done).
Only frozen weights move: adapter weights stay on the GPU with their gradients and optimizer
states. Moves swap `.data`, so the tensors autograd saved see the weights wherever they are.
"""

from __future__ import annotations

import torch


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def repeated_blocks(model) -> list:
    names = set(getattr(model, "_repeated_blocks", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _grad_tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out += [v] if v.requires_grad else []
        elif isinstance(v, (tuple, list)):
            out += _grad_tensors(v)
        elif isinstance(v, dict):
            out += _grad_tensors(v.values())
        elif hasattr(v, "to_tuple"):  # diffusers' output dataclasses
            out += _grad_tensors(v.to_tuple())
    return out


class BlockSwap:
    def __init__(self, blocks: list, device: torch.device):
        self.device = device
        self.host: dict[int, dict] = {}  # block index -> {param: CPU copy}
        self.blocks = blocks
        self.onloaded: set[int] = set()
        for i, block in enumerate(blocks):
            frozen = [p for p in block.parameters() if not p.requires_grad]
            self.host[i] = {p: self._host_copy(p.data) for p in frozen}
            self.offload(i)
            block.register_forward_pre_hook(self._before_forward(i), with_kwargs=True)
            block.register_forward_hook(self._after_forward(i))

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        host = t.to("cpu", copy=True)
        return host.pin_memory() if self.device.type == "cuda" else host

    def parked(self, host: torch.Tensor) -> torch.Tensor:
        """What an offloaded weight's `.data` is between visits: its CPU copy."""
        return host

    def onload(self, i: int) -> None:
        if i in self.onloaded:
            return
        for p, host in self.host[i].items():
            p.data = host.to(self.device, non_blocking=True, copy=True)
        self.onloaded.add(i)

    def offload(self, i: int) -> None:
        for p, host in self.host[i].items():
            p.data = self.parked(host)  # the GPU copy is freed; the CPU copy never changed
        self.onloaded.discard(i)

    def offload_all(self) -> None:
        for i in list(self.onloaded):
            self.offload(i)

    def _before_forward(self, i: int):
        def hook(module, args, kwargs):
            if not in_backward():
                self.offload_all()  # a block whose inputs needed no gradient stays on until here
                inputs = _grad_tensors([args, kwargs])
                if inputs:
                    torch.autograd.graph.register_multi_grad_hook(inputs, lambda _: self.offload(i), mode="all")
            self.onload(i)
        return hook

    def _after_forward(self, i: int):
        def hook(module, args, output):
            if in_backward():
                # Recomputed for backward (when checkpointing's early stop lets the forward finish):
                # the backward ops that follow need the weights.
                return
            outputs = _grad_tensors([output])
            if outputs:
                torch.autograd.graph.register_multi_grad_hook(outputs, lambda _: self.onload(i), mode="any")
            self.offload(i)
        return hook


    def parked_ids(self) -> set[int]:
        return {id(p) for host in self.host.values() for p in host}

    def place_rest(self, model) -> None:
        """Everything of `model` the swap does not park (the other blocks, embeddings, adapter weights
        added since) on the device."""
        parked = self.parked_ids()
        for t in (*model.parameters(), *model.buffers()):
            if id(t) not in parked and t.device != self.device:
                t.data = t.data.to(self.device)

    def bytes(self) -> int:
        return sum(h.numel() * h.element_size() for host in self.host.values() for h in host.values())


def park_blocks(model, n: int, device: torch.device) -> BlockSwap:
    """`model` (on the CPU) placed on `device` but for the frozen weights of its first `n` repeated
    blocks, which visit it; the swap is kept on the model (`swap_of`)."""
    swap = BlockSwap(repeated_blocks(model)[:n], device)
    swap.place_rest(model)
    model._finetune_block_swap = swap
    return swap


def swap_of(model) -> BlockSwap | None:
    return getattr(model, "_finetune_block_swap", None)
