"""The GPT and its blocks: embeddings, attention, MLP, the tied or compact head; forward(idx, targets,
kv_cache). Imports torch, the standard library and slm.config alone: it does not optimize, sample, or read or
write files.
"""
