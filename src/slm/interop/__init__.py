"""Hugging Face GPT-2 folders both ways and GGUF files for llama.cpp, from one table of tensor names. No model of its
own (slm.model's GPT); must not import training, inference, the assistant or serve."""
