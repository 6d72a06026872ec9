"""Training: the one loop (set-up, step, evaluate, save) and its state, the optimizers, data parallelism (DDP,
FSDP2 under torchrun) and the launcher (`slm train`, `--nproc`). It samples through slm.inference and writes
through slm.runs; it must not import the assistant, serving, export or the command line.
"""
