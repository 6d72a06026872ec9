"""What the model reads: the tokenizer, corpora prepared into token memmaps, the demo stories, story requests, the
chat template and chat data, and the windows training draws. Imports only slm.runs.files (atomic writes) and
slm.model (IGNORE_INDEX) beside the top-level modules; never training, inference, the assistant, serve or interop."""
