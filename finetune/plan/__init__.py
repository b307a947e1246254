"""`finetune plan`: the peak GPU memory and host RAM of a recipe's run on its real model, predicted
before anything heavy loads, and with `--vram` the cheapest changes that make it fit.

Nothing here loads a weight. The model is built on the meta device from its configs (`models`: the
published configs of the public bases the recipes name ship in `configs/`, so it works offline),
the recipe's method is applied to it as training applies it (`method`, `counts`: exact parameter
counts), and one training step, the latent caching and the validation samples are traced on the meta
device to measure their activations (`trace`, `activations`), scaled by factors fitted to GPU
measurements (`calibration`). `estimate` adds it up phase by phase, `advise` proposes changes,
`report` prints, `run` ties it to the command.

Importing this package imports nothing heavy; torch and diffusers load when a plan is made.
"""
