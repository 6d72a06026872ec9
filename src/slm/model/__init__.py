"""The GPT and its blocks, forward(idx, targets, kv_cache). Imports only torch, the standard library and slm.config:
it does not optimize, sample, or read and write files."""
