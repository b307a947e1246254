"""`finetune ui`: a local web app that is a face on the library. Every page reads the same files and
calls the same code as the command line: run folders are the runs' state, trainings are `finetune
train` processes.

- `roots.py`: every path the UI touches, confined to the configured root folders.
- `auth.py`: the access token, checked on every request and websocket (any host but localhost).
- `jobs.py`: the training queue: `finetune train` processes, stopped with SIGTERM, resumed.
- `runs.py`: what a run folder says: progress, losses, samples, checkpoints, evaluation.
- `app.py`: the Gradio pages, mounted on FastAPI behind the token check; `serve` starts it.
"""
