"""Whether a run learned: `finetune eval` (run.py: inputs.py checks what to measure, images.py samples
base and adapter on the same seeds, measure.py computes the metrics, report.py writes eval/) and the
metrics `validation.metrics` logs during training. Metric models load in models.py, metrics in metrics.py."""
