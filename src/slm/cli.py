"""The `slm` command line: the argparse tree and a lazy dispatch to the module that owns each command.

Heavy modules (torch, datasets) are imported inside the chosen command, so `slm --help` stays fast.
A user mistake raises `SlmError`; it is caught here once and printed as `slm: error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from slm.config import DTYPES, add_config_flags, preset_names
from slm.errors import SlmError

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
  slm bench nanogpt                                    # nanoGPT's 4x128 model: float32/bf16, full/compact head
  slm bench generate --preset cpu                      # only generation: KV cache vs recompute, batch 1 and 8
  slm bench --preset seed --steps 20 --device cuda
  slm bench train --preset cpu --vocab-head 0          # any config flag overrides the preset""",
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
  slm export runs/demo --format gguf --out demo.gguf --dtype q8_0     # llama.cpp: llama-cli -m demo.gguf""",
    "import": """examples:
  slm import path/to/gpt2-folder --out runs/gpt2        # a local GPT2LMHeadModel folder, e.g. from save_pretrained""",
    "serve": """examples:
  slm serve runs/assistant                              # chat page at http://127.0.0.1:8000/, API at /v1
  slm serve runs/assistant --host 0.0.0.0 --port 8080 --api-key "$(cat key.txt)"
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "assistant", "messages": [{"role": "user", "content": "Tell me a story."}]}'""",
}


def _parser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_config_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=preset_names(), help="start from a named preset")
    p.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (over the preset)")


def _add_checkpoint_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `slm train`")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of the run to load (default: best)")
    _add_placement(p)


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="compute precision (default: auto: bfloat16 "
                   "on CUDA and on CPUs with native bf16, float32 elsewhere)")


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes are one line, like every other slm error, instead of argparse's usage block."""

    def error(self, message: str):
        raise SlmError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="slm", description="Build a small language model from scratch: "
                                     "prepare text, train a GPT, generate, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _parser(sub, "prepare", "tokenize a corpus into train.bin / validation.bin / meta.json")
    p.add_argument("source", help="demo, tinystories, hf:NAME[:CONFIG], or a .txt/.jsonl/.parquet file "
                   "or a folder of them")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/parquet/HF rows")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents held out for validation when the source has no such split")
    p.add_argument("--seed", type=int, default=1337, help="seed of the validation hold-out")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(module="prepare")

    p = _parser(sub, "train", "train a GPT from scratch on prepared data")
    p.add_argument("--out", required=True, help="run folder for checkpoints, config.toml and metrics.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint (same command line + --resume)")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.add_argument("--nproc", type=int, default=0,
                   help="train on this many processes of this machine: runs this command under torchrun")
    _add_config_source(p)
    add_config_flags(p)
    p.set_defaults(module="train")

    p = _parser(sub, "generate", "write text with a trained model (streams to stdout)")
    _add_checkpoint_choice(p)
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely ids")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample only among the most likely ids whose probability reaches p (default: 1, all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="above 1, ids already in the prompt or the output get less likely (default: 1, none)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the sample where this text appears, leaving it out; may be repeated")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling; the same seed gives the same text")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples to write (default: 1)")
    p.set_defaults(module="generate")

    p = _parser(sub, "eval", "loss, perplexity and bits per byte of a model on a whole file")
    _add_checkpoint_choice(p)
    p.add_argument("--data", required=True, help="a prepared folder (its validation split) or a .txt/.jsonl file")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL rows")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default: 16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(module="evaluate")

    p = _parser(sub, "plot", "draw the training curves of one or more runs into an image")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder made by `slm train` (or its metrics.jsonl)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="image to write (.png, .svg or .pdf)")
    p.set_defaults(module="plot")

    p = _parser(sub, "runs", "list the runs under a folder: size, tokens, best validation loss, time, status")
    p.add_argument("dir", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    p.set_defaults(module="runs")

    p = _parser(sub, "run", "run a whole pipeline: prepare, train, generate (or fine-tune an assistant)")
    p.add_argument("pipeline", choices=("demo", "tinystories", "assistant"), help="which pipeline")
    p.add_argument("--out", default=None, help="run folder (default: runs/PIPELINE)")
    p.add_argument("--data-out", default=None, help="prepared data folder (default: data/PIPELINE)")
    p.add_argument("--max-minutes", type=float, default=None, help="training time budget in minutes "
                   "(assistant: of both stages together; default 20)")
    p.add_argument("--source", default=None, help="assistant: the story corpus, any source `slm prepare` takes "
                   "(default: demo)")
    p.add_argument("--preset", default=None, choices=preset_names(),
                   help="assistant: the model and batch preset of both stages (default: cpu)")
    p.add_argument("--eval-prompts", type=int, default=60,
                   help="assistant: held-out requests scored at the end, per model (default: 60)")
    p.add_argument("--force", action="store_true", help="replace existing data and run folders")
    p.set_defaults(module="run")

    p = _parser(sub, "bench", "measure prepare, training and generation throughput and peak memory")
    p.add_argument("what", nargs="?", choices=("all", "prepare", "nanogpt", "train", "generate"),
                   default="all", help="measure only this part (default: all)")
    p.add_argument("--preset", choices=preset_names(), default="cpu",
                   help="model and batch of the train and generate figures (default: cpu)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps after warm-up (default: 10)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens per generation run (default: 200)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--save", action="store_true", help="also write the results as JSON into --results-dir")
    p.add_argument("--results-dir", default="benchmarks/results",
                   help="folder for --save's DATE-PRESET-DEVICE[-PART].json (default: benchmarks/results)")
    add_config_flags(p, exclude=("data", "device"))
    p.set_defaults(module="bench")

    p = _parser(sub, "make-instructions", "make chat data (instructions and answers) from a story corpus")
    p.add_argument("source", help="demo, tinystories, hf:NAME[:CONFIG], or a .txt/.jsonl/.parquet file or folder")
    p.add_argument("--out", required=True, help="the .jsonl file of training conversations to write")
    p.add_argument("--prompts-out", metavar="FILE", help="also write held-out prompts, for `slm eval-assistant`")
    p.add_argument("--held-out", type=float, default=None, metavar="N|FRACTION",
                   help="where the source has no validation split: training stories held out for --prompts-out, "
                        "the first N or a fraction (default: 100)")
    p.add_argument("--epochs", type=int, default=1,
                   help="conversations per training story, each with fresh random choices (default: 1)")
    p.add_argument("--max-stories", type=int, default=0, help="read at most this many stories (default: 0, all)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/parquet/HF rows")
    p.add_argument("--seed", type=int, default=1337, help="seed of the instruction kinds and word choices")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.set_defaults(module="instructions")

    p = _parser(sub, "finetune", "fine-tune a trained run on chat data, with the loss on the assistant's tokens only")
    p.add_argument("run", help="the base run folder, written by `slm train`")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of the base run to start from (default: best)")
    p.add_argument("--data", required=True,
                   help='chat data: a .jsonl file of {"messages": [...]} or {"instruction", "input", "output"} rows')
    p.add_argument("--val-data", metavar="FILE", help="validation conversations (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of --data held out for validation when there is no --val-data (default: 0.05)")
    p.add_argument("--out", required=True, help="run folder for the fine-tuned model")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune in --out (same command + --resume)")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    add_config_flags(p, ("train",), exclude=("data",))
    p.set_defaults(module="finetune")

    p = _parser(sub, "chat", "chat with a model in the terminal; with stdin not a terminal, one answer per line")
    _add_checkpoint_choice(p)
    p.add_argument("--system", default=None, help="a system message that starts every conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; higher = more random (default: the run's sampling.json, else 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely ids")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling probability (default: the run's sampling.json, else 1)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="above 1, ids already used get less likely (default: the run's sampling.json, else 1)")
    p.add_argument("--word-bias", type=float, default=None, help="added to the logits of the words a request "
                   "names until the answer uses each (default: the run's sampling.json, else 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling; the same seed gives the same answers")
    p.set_defaults(module="chat")

    p = _parser(sub, "eval-assistant", "score runs on held-out instruction prompts, side by side")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders to compare, e.g. the base and the fine-tune")
    p.add_argument("--prompts", required=True, help="held-out prompts written by `slm make-instructions --prompts-out`")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="checkpoint of each run (default: best)")
    _add_placement(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher samples")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely ids")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the likeliest ids up to this "
                   "probability (default: 1, all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="above 1, ids already in the prompt or answer get less likely (default: 1, none)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling when --temperature > 0 (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N prompts")
    p.add_argument("--word-bias", type=float, default=0.0,
                   help="added to the logits of the words a request names until the answer uses each (default: 0)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="also print the first N answers of each run")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default: 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(module="eval_assistant")

    p = _parser(sub, "serve", "serve a model over an OpenAI-compatible HTTP API, with a web chat page")
    _add_checkpoint_choice(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every network "
                   "(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: none)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="the most tokens a request may generate per choice, and its default (default: 512)")
    p.add_argument("--max-batch", type=int, default=16, help="the most rows decoded at once; n choices take "
                   "n rows, and later requests wait (default: 16)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000,
                   help="the largest request body accepted (default: 1000000)")
    p.set_defaults(module="serve")

    p = _parser(sub, "export", "write a run as a Hugging Face GPT-2 folder or a GGUF file for llama.cpp")
    p.add_argument("run", help="run folder written by `slm train` or `slm finetune`")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of the run to export (default: best)")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf: a transformers model folder "
                   "(default); gguf: one file for llama.cpp")
    p.add_argument("--out", required=True, help="the folder (hf) or .gguf file to write")
    p.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default="f16",
                   help="gguf: storage of the weight matrices; norms and biases stay f32 (default: f16)")
    p.add_argument("--push-to-hub", metavar="REPO", help="hf: also upload the folder to this Hub repository "
                   "(needs `hf auth login` and the network)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(module="export")

    p = _parser(sub, "import", "turn a local Hugging Face GPT-2 folder into an slm run")
    p.add_argument("dir", help="a folder with config.json and model.safetensors or pytorch_model.bin")
    p.add_argument("--out", required=True, help="run folder to write (config.toml, best/, last/)")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.set_defaults(module="export")  # `import` is a Python keyword: export.py owns both directions
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        module = importlib.import_module(f"slm.{args.module}")
        return module.main(args) or 0
    except SlmError as err:
        print(f"slm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slm: interrupted", file=sys.stderr)
        return 130
