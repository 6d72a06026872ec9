"""The `slm` command line: the table of commands and a lazy dispatch to the module that owns each one.

A command's module declares its arguments in `add_arguments(parser)`, next to the `main(args)` that reads
them. Command modules import torch, so only the chosen one is imported: `slm --help` lists the commands
without loading torch, and `slm train --help` shows train's flags. A user mistake raises `SlmError`; it is
caught here once and printed as `slm: error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from slm.errors import SlmError

# name -> (the module in slm that owns the command, one line of help). interop/huggingface.py owns `import` too, a
# Python keyword, and declares its arguments in add_import_arguments.
COMMANDS = {
    "prepare": ("data.prepare", "tokenize a corpus into train.bin / validation.bin / meta.json"),
    "train": ("training.loop", "train a GPT from scratch on prepared data"),
    "generate": ("inference.generate", "write text with a trained model (streams to stdout)"),
    "eval": ("inference.perplexity", "loss, perplexity and bits per byte of a model on a whole file"),
    "plot": ("runs.plot", "draw the training curves of one or more runs into an image"),
    "runs": ("runs.listing", "list the runs under a folder: size, tokens, best validation loss, time, status"),
    "run": ("pipelines", "run a whole pipeline: prepare, train, generate (or fine-tune an assistant)"),
    "bench": ("bench", "measure throughput and peak memory, each speed as a share of the machine's limit"),
    "make-instructions": ("assistant.instructions", "make chat data (instructions and answers) from a story corpus"),
    "finetune": ("assistant.finetune", "fine-tune a trained run on chat data, with the loss on the assistant's "
                 "tokens only"),
    "chat": ("assistant.chat", "chat with a model in the terminal; with stdin not a terminal, one answer per line"),
    "eval-assistant": ("assistant.evaluate", "score runs on held-out instruction prompts, side by side"),
    "serve": ("serve.app", "serve a model over an OpenAI-compatible HTTP API, with a web chat page"),
    "export": ("interop.huggingface", "write a run as a Hugging Face GPT-2 folder or a GGUF file for llama.cpp"),
    "import": ("interop.huggingface", "turn a local Hugging Face GPT-2 folder into an slm run"),
}

# What each command's --help ends with; here beside the table, so the user-facing text of the CLI is in one place.
EXAMPLES = {
    "prepare": """examples:
  slm prepare demo --out data/demo                      # the built-in story corpus (offline)
  slm prepare tinystories --out data/tinystories        # Hugging Face roneneldan/TinyStories
  slm prepare stories.txt --out data/mine               # documents separated by <|endoftext|> lines
  slm prepare corpus.jsonl --text-field body --out data/mine
  slm prepare hf:wikitext:wikitext-2-raw-v1 --out data/wiki   # hf:NAME[:CONFIG]""",
    "train": """examples:
  slm train --data data/demo --out runs/demo --preset cpu
  slm train --data data/demo --out runs/small --n-layer 2 --learning-rate 3e-4 --max-minutes 5
  slm train --data data/demo --out runs/muon --preset cpu --optimizer muon   # Muon for the blocks' matrices
  slm train --config runs/demo/config.toml --out runs/again
  slm train --data data/demo --out runs/demo --preset cpu --resume     # continue after a stop or a crash
  slm train --data data/demo --out runs/ddp --nproc 2                  # data parallel: torchrun, 2 processes
  slm train --data data/demo --out runs/demo --preset cpu --tensorboard   # then: tensorboard --logdir runs
  torchrun --nproc_per_node 8 -m slm train --data data/ts --out runs/ts --preset seed   # the same, by hand""",
    "generate": """examples:
  slm generate runs/demo --prompt "Once upon a time" --max-new-tokens 200
  slm generate runs/demo --temperature 0                # greedy
  slm generate runs/demo --top-k 40 --seed 7 --num-samples 3
  slm generate runs/demo --top-p 0.9 --repetition-penalty 1.2 --stop "The end." --stop $'\\n\\n'""",
    "eval": """examples:
  slm eval runs/demo --data data/demo                   # the prepared validation split
  slm eval runs/demo --data valid.txt --json            # any raw .txt or .jsonl file""",
    "plot": """examples:
  slm plot runs/demo --out curves.png                   # loss, bits per byte, LR, tokens/s vs steps and tokens
  slm plot runs/a runs/b runs/c --out compare.png       # several runs overlaid
  slm plot runs/demo/metrics.jsonl --out demo.svg       # a metrics file; .png, .svg or .pdf""",
    "runs": """examples:
  slm runs                                              # every run under runs/
  slm runs experiments/                                 # or under another folder""",
    "run": """examples:
  slm run demo                                          # offline: prepare, train (CPU, <10 min), generate
  slm run tinystories --out runs/tinystories            # the real corpus from the hub (GPU recommended)
  slm run assistant --source stories.txt --out runs/me   # an assistant from your stories, 20 min on a CPU
  slm run assistant --max-minutes 5                     # the demo corpus, a quicker and weaker one""",
    "bench": """examples:
  slm bench --save                                     # everything; also writes benchmarks/results/*.json
  slm bench peak                                       # this machine's GEMM peaks and read bandwidths alone
  slm bench nanogpt                                    # nanoGPT's 4x128 model: float32/bf16, full/compact head
  slm bench generate --preset cpu                      # only generation: KV cache vs recompute, batch 1 and 8
  slm bench --preset seed --steps 20 --device cuda
  slm bench train --preset cpu --vocab-head 0          # any config flag overrides the preset
  slm bench optimizers --data data/demo --target-loss 3 --max-minutes 5   # adamw vs muon: steps, minutes to 3""",
    "make-instructions": """examples:
  slm make-instructions demo --out chat.jsonl --prompts-out prompts.jsonl         # 100 held-out stories
  slm make-instructions stories.txt --out chat.jsonl --prompts-out p.jsonl --held-out 0.02 --seed 7""",
    "finetune": """examples:
  slm finetune runs/demo --data chat.jsonl --out runs/assistant
  slm finetune runs/demo --data chat.jsonl --val-data prompts.jsonl --out runs/assistant --max-steps 500
  slm finetune runs/demo --data alpaca.jsonl --out runs/alpaca --learning-rate 1e-4 --force
train flags default to the base run's settings, except: --max-steps 300 --warmup-steps 30 --eval-interval 50
--learning-rate 3e-4, --min-learning-rate a tenth of the learning rate, and no --max-minutes or --max-tokens""",
    "chat": """examples:
  slm chat runs/assistant                               # interactive: /reset, /temperature X, /exit
  slm chat runs/assistant --system "You tell short stories." --temperature 0.5 --top-k 40
  echo "Write a story about Tom that uses the words ball, tree and happy." | slm chat runs/assistant""",
    "eval-assistant": """examples:
  slm eval-assistant runs/demo runs/assistant --prompts prompts.jsonl     # base vs fine-tuned
  slm eval-assistant runs/assistant --prompts prompts.jsonl --limit 20 --json""",
    "export": """examples:
  slm export runs/demo --out exports/demo               # Hugging Face folder: AutoModelForCausalLM, pipeline
  slm export runs/assistant --out exports/assistant --push-to-hub NAME/assistant
  slm export runs/demo --format gguf --out demo.gguf --outtype q8_0     # llama.cpp: llama-cli -m demo.gguf""",
    "import": """examples:
  slm import path/to/gpt2-folder --out runs/gpt2        # a local GPT2LMHeadModel folder, e.g. from save_pretrained""",
    "serve": """examples:
  slm serve runs/assistant                              # chat page at http://127.0.0.1:8000/, API at /v1
  SLM_API_KEY="$(cat key.txt)" slm serve runs/assistant --host 0.0.0.0 --port 8080   # the key not in `ps`
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "assistant", "messages": [{"role": "user", "content": "Tell me a story."}]}'""",
}


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes are one line, like every other slm error, instead of argparse's usage block."""

    def error(self, message: str):
        raise SlmError(f"{message}; see `{self.prog} --help`")


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"slm.{COMMANDS[name][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, with the arguments of `command` alone (its module is imported to
    declare them); the others are names and help, which is all `slm --help` shows."""
    parser = OneLineErrorParser(prog="slm", description="Build a small language model from scratch: "
                                     "prepare text, train a GPT, generate, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    for name, (_, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module = command_module(name)
            (module.add_import_arguments if name == "import" else module.add_arguments)(p)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argv parsed by a parser that knows the chosen command's arguments: the command is argv's first word
    that is not an option (`slm` itself has no option taking a value)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((word for word in argv if not word.startswith("-")), None)
    return build_parser(command if command in COMMANDS else None).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return command_module(args.command).main(args) or 0
    except SlmError as err:
        print(f"slm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slm: interrupted", file=sys.stderr)
        return 130
