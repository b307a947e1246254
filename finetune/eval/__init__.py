"""Evaluation of a trained adapter: metric models and metrics (`metrics`) that `finetune eval` and
`validation.metrics` compute on generated images."""
