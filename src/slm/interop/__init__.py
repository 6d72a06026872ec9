"""Other tools' formats: Hugging Face GPT-2 folders both ways (`slm export`, `slm import`) and GGUF files for
llama.cpp, from one table of tensor names. It defines no model of its own (slm.model's GPT is the one) and must
not import training, inference, the assistant or serving.
"""
