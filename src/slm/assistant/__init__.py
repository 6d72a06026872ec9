"""The assistant: chat data from stories, fine-tuning, reading requests and checking answers, following a request,
`slm chat` and `slm eval-assistant`. It has no loop or decoder of its own (slm.training's and slm.inference's)
and must not import serve or interop."""
