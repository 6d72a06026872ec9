"""The run folder: its files and atomic writes, checkpoints, the metrics log, the model card, curves and `slm runs`.
It records what a run did and decides nothing about training; it imports slm.model (to rebuild a checkpoint) and
never data, training, inference, the assistant, serve or interop."""
