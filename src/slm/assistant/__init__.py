"""The assistant: chat data made from stories (`slm make-instructions`), fine-tuning through the training loop
(`slm finetune`), reading a request and checking an answer, following a request while answering, `slm chat` and
`slm eval-assistant`. It has no loop or decoder of its own (it uses slm.training and slm.inference) and must not
import serving or export.
"""
