"""The Gradio pages of `finetune ui`, and `serve`: Gradio mounted on a FastAPI app whose every request
and websocket passes the token check (auth.py), bound to localhost unless told otherwise.

Each page calls the library (datasets.py, form.py, jobs.py, runs.py, finetune.generate, the
watermark detector); a handler's FinetuneError is shown on the page as its one line, never a
traceback. Long work (a generation, a plan) runs in Gradio's worker threads, so the pages stay live."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError
from .roots import Roots

STATE = ".finetune-ui"  # in the first root: job files, logs, uploads, generated images
REFRESH_S = 2.0
MAX_UPLOAD = "50mb"  # Gradio refuses a larger upload before it is written (datasets.MAX_UPLOAD_BYTES: the same)


@dataclass
class Context:
    roots: Roots
    jobs: object  # jobs.Jobs
    state: Path  # <first root>/outputs/.finetune-ui

    @property
    def outputs(self) -> Path:
        return self.state.parent


def make_context(roots: Roots) -> Context:
    from .jobs import Jobs

    state = roots.confine(roots.folders[0] / "outputs" / STATE, must_exist=False)
    state.mkdir(parents=True, exist_ok=True)
    return Context(roots, Jobs(roots, state), state)


def shown(handler):
    """A handler whose FinetuneError becomes its one line on the page (as a gr.Error toast)."""
    import functools

    import gradio as gr

    @functools.wraps(handler)
    def run(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except FinetuneError as e:
            raise gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - the page gets one line; the traceback goes to the server's log
            import traceback

            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            raise gr.Error(f"{type(e).__name__}: {first}") from None
    return run


def build_blocks(ctx: Context):
    import gradio as gr

    from . import pages

    with gr.Blocks(title="finetune", analytics_enabled=False) as blocks:
        gr.Markdown("# finetune\nCheck a dataset, train, watch, compare and generate. Roots: " +
                    ", ".join(f"`{f}`" for f in ctx.roots.folders))
        with gr.Tabs():
            with gr.Tab("Datasets", id="datasets"):
                pages.datasets_page(ctx)
            with gr.Tab("Train", id="train"):
                pages.train_page(ctx)
            with gr.Tab("Runs", id="runs"):
                pages.runs_page(ctx)
            with gr.Tab("Generate", id="generate"):
                pages.generate_page(ctx)
            with gr.Tab("Compare", id="compare"):
                pages.compare_page(ctx)
    return blocks


def build_app(ctx: Context, token: str | None):
    """The ASGI app: FastAPI + the Gradio pages, every path of it behind the token check."""
    import gradio as gr
    from fastapi import FastAPI

    from .auth import TokenMiddleware

    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app = gr.mount_gradio_app(api, build_blocks(ctx), path="", allowed_paths=[str(f) for f in ctx.roots.folders],
                              ssr_mode=False, footer_links=[], show_error=True, max_file_size=MAX_UPLOAD)
    return TokenMiddleware(app, token)


def serve(host: str, port: int, folders: list[str], token: str | None, log=print) -> None:
    """Serve until interrupted. Uploads and Gradio's copies of images stay inside the first root."""
    import uvicorn

    from .auth import needs_token, new_token

    roots = Roots(folders)
    if needs_token(host) and not token:
        token = new_token()
        log(f"access token (printed once): {token}")
    ctx = make_context(roots)
    os.environ["GRADIO_TEMP_DIR"] = str(roots.confine(ctx.state / "tmp", must_exist=False))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(ctx, token)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    log(f"finetune ui: {where}" + (f"?token={token}" if token else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning")


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
