"""finetune: personalize text-to-image diffusion models from a folder of images and a YAML recipe."""

__version__ = "0.1.0"
