"""Using a trained model: the KV cache, sampling filters and logit biases, the continuous-batching engine that
every command decodes on, `slm generate` and `slm eval` (perplexity). It reads checkpoints through slm.runs; it
must not import training, the assistant, serving (it speaks no HTTP) or export.
"""
