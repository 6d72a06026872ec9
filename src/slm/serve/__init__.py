"""`slm serve`: the OpenAI-compatible app and its chat page, the request schema and limits, the worker thread that
owns the model, serving from a thread. No sampling code of its own (slm.inference's); must not import training."""
