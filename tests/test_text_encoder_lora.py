"""A LoRA on the text encoder(s), trained on each family's tiny model and loaded back through
diffusers' own `load_lora_weights`: the path a user's code takes, and the one a dependency pair
that refuses text-encoder adapters (transformers 5.24 with peft 0.21) breaks."""

import pytest
import torch
from safetensors.torch import load_file

from finetune.families import get_family
from finetune.tiny_models import resolve_builtin

from .conftest import TINY_BASES

# The text encoders a text-encoder LoRA adapts, per family (FLUX's T5 never takes one).
ADAPTED = {"sd1": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"], "flux": ["text_encoder"]}


def _encoder_outputs(pipe, names):
    out = {}
    for name in names:
        tok = getattr(pipe, name.replace("text_encoder", "tokenizer"))
        ids = tok(["a photo of a ball"], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            out[name] = getattr(pipe, name)(ids)[0]
    return out


@pytest.mark.smoke
@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_text_encoder_lora_trains_and_reloads_through_diffusers(tiny_run, family):
    from peft.utils import get_peft_model_state_dict

    run_dir = tiny_run(family, "lora")
    saved = load_file(str(run_dir / "pytorch_lora_weights.safetensors"))
    for name in ADAPTED[family]:
        assert any(k.startswith(f"{name}.") for k in saved), f"no {name} LoRA in the diffusers file"

    pipe = get_family(family).pipeline_class.from_pretrained(resolve_builtin(TINY_BASES[family].split(":")[1]))
    before = _encoder_outputs(pipe, ADAPTED[family])
    pipe.load_lora_weights(str(run_dir))
    after = _encoder_outputs(pipe, ADAPTED[family])

    for name in ADAPTED[family]:
        loaded = get_peft_model_state_dict(getattr(pipe, name), adapter_name=pipe.get_list_adapters()[name][0])
        file_part = {k.removeprefix(f"{name}."): v for k, v in saved.items() if k.startswith(f"{name}.")}
        assert len(loaded) == len(file_part) > 0
        for key, value in file_part.items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
        assert (after[name] - before[name]).abs().max() > 1e-6, f"{name}: the loaded LoRA changes nothing"
