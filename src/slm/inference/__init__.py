"""Using a model: the KV cache, sampling and logit biases, the continuous-batching engine every command decodes on,
`slm generate` and `slm eval`. It loads runs through slm.runs; it must not import training, the assistant, serve
(it speaks no HTTP) or interop."""
