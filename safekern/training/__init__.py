"""Training the safety delta: ``trainer`` (the full-model recipe on the HF Trainer: joint loss,
``EssTrainer``, the tiny default model), ``collate`` (its collator: training rows and the phase
masks' metadata), ``frozen`` (the frozen-LM recipe: windows, sequence K/V, the [CLS]-row
forward, the linear head), ``adapter`` (the [CLS] adapter recipe), ``probe_fit`` (the cascade's
screening probe), ``calibration`` (replaying the controller to pick threshold and tau),
``responses`` (the base model's own answers as training data) and ``real`` (``safekern train
--model NAME`` end to end).

May import everything below it (``spec`` … ``runtime``, ``models``, ``integrations``,
``evaluation``, ``data``); only the CLI imports it. Nothing is imported here eagerly: training
pulls in transformers and datasets.
"""
