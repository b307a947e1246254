import os

# The suite never touches the network, and never writes into the user's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test process (pytest -n 2 on two cores): OpenMP threads of two processes
    # spinning against each other make torch several times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("finetune-cache")
    old = os.environ.get("FINETUNE_CACHE")
    os.environ["FINETUNE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FINETUNE_CACHE", None)
    else:
        os.environ["FINETUNE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _isolated_config(tmp_path_factory):
    """The local C2PA signing credential is made in the user's config folder: here, one per test
    process, never the developer's own; a credential set in the environment does not leak in."""
    saved = {k: os.environ.get(k) for k in ("XDG_CONFIG_HOME", "FINETUNE_C2PA_CERT", "FINETUNE_C2PA_KEY")}
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config"))
    os.environ.pop("FINETUNE_C2PA_CERT", None)
    os.environ.pop("FINETUNE_C2PA_KEY", None)
    yield Path(os.environ["XDG_CONFIG_HOME"])
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy CI box OpenMP workers waiting on each
    other turn a 30 ms call into seconds. Restored after the module that asks for it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """A tiny SD1.5 saved as a plain diffusers folder, loaded like any user's local model."""
    from finetune.tiny_models.sd15 import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


TINY_BASES = {"sd1": "builtin:tiny-sd15", "sdxl": "builtin:tiny-sdxl", "flux": "builtin:tiny-flux"}
TOKEN = "<sks-ball>"


def _method_section(method: str) -> dict:
    lora = {"rank": 4, "alpha": 4, "train_text_encoder": True, "text_encoder_lr": 1e-3}
    # "x": the tiny byte-level tokenizers make every longer word several tokens.
    ti = {"placeholder_token": TOKEN, "initializer_token": "x", "num_vectors": 2}
    return {"lora": {"type": "lora", **lora}, "textual_inversion": {"type": "textual_inversion", **ti},
            "pivotal": {"type": "pivotal", **lora, **ti}, "dreambooth": {"type": "dreambooth"}}[method]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`tiny_run(family, method)`: a run folder of a few training steps of `method` on the family's
    built-in tiny model (the path a user's `builtin:` base takes), trained once per session."""
    from finetune.recipe import validate
    from finetune.train import train

    from .helpers import make_image_folder

    runs = {}

    def make(family: str, method: str) -> Path:
        if (family, method) not in runs:
            tmp = tmp_path_factory.mktemp(f"{family}-{method}")
            data = make_image_folder(tmp / "data", n=4, sizes=((64, 64),), caption=f"a photo of {TOKEN} ball")
            recipe = {
                "model": {"base": TINY_BASES[family]},
                "data": {"path": str(data), "resolution": 64},
                "method": _method_section(method),
                "training": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "seed": 0},
                "validation": {"num_inference_steps": 2, "guidance_scale": 3.0},
                # Relative, as in the bundled recipes: the model card must still name absolute paths.
                "output": {"dir": "out", "run_name": f"{family}-{method}", "save_dtype": "fp32",
                           "trigger_words": [f"a photo of {TOKEN} ball"]},
            }
            old = os.getcwd()
            os.chdir(tmp)
            try:
                run = train(validate(recipe, "test"), log=lambda *_: None, progress=False).run_dir
            finally:
                os.chdir(old)
            runs[family, method] = tmp / run
        return runs[family, method]

    return make
