"""Exporters: files other tools read (kohya/webui and diffusers LoRA files, model cards)."""
