"""How traced activations become predicted GPU memory, and the measurements that say so.

A meta-device trace (`trace.py`) counts the tensors a step keeps; a CUDA run under autocast keeps
more: fp32 copies around normalisations and softmax, half-precision copies of fp32 inputs, cuDNN
and cuBLAS workspaces. The factors below turn one into the other. They were fitted on the H100
measurements of an SD1.5-shaped LoRA in `benchmarks/results/lora_memory_h100_batch{1,4}.md`
(`H100_SD15` here; the tests check every row is reproduced within `TOLERANCE`): the ratio of
measured minus weights, trained parameters and optimizer states, to traced activations, which
held within 3% across batch 1 and 4, with and without gradient checkpointing:

- fp32: 0.92 (batch 1), 0.95 (batch 4) -> 0.935
- fp16 autocast: 1.39, 1.37 (no checkpointing), 1.36 (checkpointing, batch 4) -> 1.38; bf16 measured
  the same as fp16.
- without gradients (the VAE encoding images for the latent cache, which is the peak of the
  checkpointed batch-1 runs): 1.2.

Every new GPU figure belongs in this table, with the recipe settings it ran with.
"""

from __future__ import annotations

ACTIVATION_FACTOR = {"no": 0.935, "fp16": 1.38, "bf16": 1.38}
INFERENCE_FACTOR = 1.2
# Allocated outside PyTorch's caching allocator, so not in max_memory_allocated, but on the card:
# the CUDA context, kernels and library handles (about 0.3-0.6 GiB on recent drivers).
CUDA_CONTEXT_GIB = 0.5
# Host memory of the training process besides weights and caches: Python, torch, diffusers,
# transformers, peft, accelerate and bitsandbytes imported, the data loader, the tokenizers. Measured:
# `finetune train quickstart` on the CPU (a tiny model: 12 MB of weights) peaks at 0.52 GiB resident,
# 0.41 GiB of which is the imports alone (torch 2.13 CPU, diffusers 0.42.1); tests/test_plan_measured.py
# checks it.
HOST_PROCESS_GIB = 0.5
# On a CUDA machine, also the CUDA runtime, cuBLAS and cuDNN mapped into the process (not measured here:
# the rest of the 1.5 GiB the plan assumed before this was split).
CUDA_HOST_GIB = 1.0
# Peak host RAM while loading, relative to the bytes of the weights in the dtype they are read in
# (issue 13's target for dtype-true loading).
LOADING_OVERHEAD = 1.3
TOLERANCE = 0.20

# benchmarks/lora_memory.py: builtin:sd15-full-random, LoRA rank 16 (alpha 16) on the family's
# targets, 512 px, 8 images, latents and text embeddings cached, no validation, the text encoder and
# the VAE on the GPU all run (measured before finetune could offload them); peak =
# torch.cuda.max_memory_allocated() over the whole run (H100 80GB, torch 2.11.0+cu130).
H100_SD15_RECIPE = ["model.base=builtin:sd15-full-random", "data.resolution=512", "method.rank=16",
                    "method.alpha=16", "validation.prompts=[]", "prior_preservation.enabled=false",
                    "memory.text_encoders=keep", "memory.vae=keep"]
H100_SD15 = [
    # (configuration, recipe overrides, batch, measured peak GiB)
    ("fp32, AdamW", ["training.mixed_precision=no", "optimizer.type=adamw",
                     "training.gradient_checkpointing=false"], 1, 5.78),
    ("fp16, AdamW", ["training.mixed_precision=fp16", "optimizer.type=adamw",
                     "training.gradient_checkpointing=false"], 1, 3.53),
    ("fp16, AdamW 8-bit", ["training.mixed_precision=fp16", "optimizer.type=adamw8bit",
                           "training.gradient_checkpointing=false"], 1, 3.49),
    ("fp16, AdamW 8-bit, checkpointing", ["training.mixed_precision=fp16", "optimizer.type=adamw8bit",
                                          "training.gradient_checkpointing=true"], 1, 2.92),
    ("bf16, AdamW 8-bit, checkpointing", ["training.mixed_precision=bf16", "optimizer.type=adamw8bit",
                                          "training.gradient_checkpointing=true"], 1, 2.92),
    ("bf16, Lion 8-bit, checkpointing", ["training.mixed_precision=bf16", "optimizer.type=lion8bit",
                                         "training.gradient_checkpointing=true"], 1, 2.92),
    ("fp32, AdamW", ["training.mixed_precision=no", "optimizer.type=adamw",
                     "training.gradient_checkpointing=false"], 4, 11.07),
    ("fp16, AdamW", ["training.mixed_precision=fp16", "optimizer.type=adamw",
                     "training.gradient_checkpointing=false"], 4, 7.33),
    ("fp16, AdamW 8-bit", ["training.mixed_precision=fp16", "optimizer.type=adamw8bit",
                           "training.gradient_checkpointing=false"], 4, 7.29),
    ("fp16, AdamW 8-bit, checkpointing", ["training.mixed_precision=fp16", "optimizer.type=adamw8bit",
                                          "training.gradient_checkpointing=true"], 4, 3.51),
    ("bf16, AdamW 8-bit, checkpointing", ["training.mixed_precision=bf16", "optimizer.type=adamw8bit",
                                          "training.gradient_checkpointing=true"], 4, 3.51),
    ("bf16, Lion 8-bit, checkpointing", ["training.mixed_precision=bf16", "optimizer.type=lion8bit",
                                         "training.gradient_checkpointing=true"], 4, 3.51),
]
