"""`slm serve`: the OpenAI-compatible FastAPI app and its chat page, the request schema and limits, the worker
thread that owns the model, and serving from a thread for tests. It contains no sampling code (slm.inference
decodes, slm.assistant follows requests) and must not import training or export.
"""
