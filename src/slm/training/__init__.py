"""The training loop and its state, the optimizers, data parallelism (DDP, FSDP2) and the torchrun launcher. It
samples through slm.inference and saves through slm.runs; it must not import the assistant, serve, interop or cli."""
