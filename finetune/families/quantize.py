"""The frozen denoiser loaded quantized (`memory.quantize_base`), QLoRA style: its Linear weights
stored in 8 or 4 bits while LoRA (or textual inversion) trains in full precision beside them.

- int8 / nf4: bitsandbytes through diffusers' `BitsAndBytesConfig`, as diffusers' QLoRA examples
  load FLUX (NF4 with the training weight dtype as compute dtype). bitsandbytes 0.50 runs its 4- and
  8-bit layers on the CPU, but diffusers' bitsandbytes quantizers refuse to load without a GPU
  (`validate_environment`: "No GPU found"), so on a CPU these are refused before anything loads.
- torchao-int8: torchao's int8 weight-only quantization through diffusers' `TorchAoConfig`, on any
  device; peft wraps such layers with its `TorchaoLoraLinear`.

Each family passes its denoiser class here (`load_denoiser`) and hands the result to its pipeline
as a component; the checks (`problem`, `SINGLE_FILE`) run in preflight too, so a recipe that cannot
load is one line before any model does."""

from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING

from ..errors import FinetuneError
from .base import ModelSource, dtype_kwargs

if TYPE_CHECKING:
    import torch

KEY = "memory.quantize_base"
PACKAGES = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "torchao-int8": "torchao"}
# diffusers 0.42's model-level `from_single_file` builds its quantizer as for a pre-quantized file
# (`DiffusersAutoQuantizer.from_config` without `pre_quantized=False`): torchao then leaves every weight
# unquantized without a word, and bitsandbytes asks for quantization statistics the file lacks. So a
# single file is refused rather than trained at full size under a quantized name.
SINGLE_FILE = (f"{KEY}: diffusers cannot quantize a single-file checkpoint while loading it; save the model "
               "as a diffusers folder (pipe.save_pretrained) and set model.base to it, or set none")
# peft's TorchaoLoraLinear (peft.import_utils.is_torchao_available) refuses older torchao releases.
TORCHAO_MINIMUM = "0.16.0"


def installed(package: str) -> bool:
    return find_spec(package) is not None


def problem(kind: str) -> str | None:
    """Why `kind` cannot load the denoiser on this machine (one `memory.quantize_base: ...` line),
    found without loading anything; None when it can (and for "none")."""
    if kind == "none":
        return None
    if kind not in PACKAGES:
        return f"{KEY}: unknown {kind!r}; expected one of none, {', '.join(PACKAGES)}"
    package = PACKAGES[kind]
    if package == "bitsandbytes" and not _bitsandbytes_device():
        return (f"{KEY}: {kind} needs a CUDA GPU (bitsandbytes, which diffusers loads only onto a GPU); "
                "use torchao-int8 or none on this machine")
    if not installed(package):
        return f"{KEY}: {kind} needs the {package} package (pip install {package}); or set none"
    if package == "torchao" and _older(package, TORCHAO_MINIMUM):
        return f"{KEY}: {kind} needs torchao {TORCHAO_MINIMUM} or newer (pip install -U torchao); or set none"
    return None


def _bitsandbytes_device() -> bool:
    import torch

    return torch.cuda.is_available()


def _older(package: str, minimum: str) -> bool:
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version(package)) < Version(minimum)


def quantization_config(kind: str, dtype: torch.dtype):
    """diffusers' quantization config for `kind`; `dtype`: the weight dtype training computes in."""
    if kind == "torchao-int8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    from diffusers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_denoiser(model_class, source: ModelSource, cfg, subfolder: str, kind: str, dtype: torch.dtype | None):
    """The denoiser (`model_class`, in `subfolder` of a diffusers folder or hub model) read quantized as
    `kind`, its unquantized parts in `dtype` (None: float32), frozen and ready for LoRA."""
    import torch

    if why := problem(kind) or (SINGLE_FILE if source.kind == "single_file" else None):
        raise FinetuneError(why)
    dtype = dtype or torch.float32
    model = model_class.from_pretrained(source.location, subfolder=subfolder, revision=cfg.revision,
                                        variant=cfg.variant, use_safetensors=None if cfg.allow_pickle else True,
                                        low_cpu_mem_usage=True, quantization_config=quantization_config(kind, dtype),
                                        **dtype_kwargs(dtype))
    return prepare_for_training(model)


def prepare_for_training(model):
    """As diffusers' QLoRA examples do: every weight frozen, the few unquantized bitsandbytes-model
    weights (norms, embedders) upcast to fp32 (peft leaves torchao models' dtypes as they are), and no
    checkpointing hooks here (training.gradient_checkpointing decides that)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
