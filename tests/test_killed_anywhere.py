"""Every stage killed anywhere (issue 30): `slm prepare`, `make-instructions`, `finetune` and `export` are
SIGKILLed at seeded random moments, most of them while the stage writes. After each kill the output is absent
or complete (identical to a run never stopped; a fine-tune's checkpoints verify), and the next attempt (the
same command with --force, or --resume for a fine-tune) is itself killed, until a last one runs to the end:
its outputs must be those of the run never stopped, with no temporary left behind.

One loop serves the four stages (export in both formats); `SLM_KILLS` kills each (default 5: each kill costs a
Python start-up, and a fine-tune's about 10 s here); benchmarks/killed_anywhere.py runs it with 20 kills a stage
and prints what the kills left."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_conversations
from slm.data.prepare import read_meta
from slm.data.stories import demo_documents
from slm.runs import checkpoint
from slm.runs.files import read_metrics

KILLS = int(os.environ.get("SLM_KILLS", "5"))
PROMPTS = "prompts.jsonl"  # make-instructions' second output, beside its --out
FINETUNE_FLAGS = ["--max-steps", "12", "--eval-interval", "4", "--eval-batches", "2", "--warmup-steps", "2",
                  "--device", "cpu", "--sample-tokens", "0", "--dtype", "float32", "--keep-checkpoints", "3"]


@dataclass
class Stage:
    """A command writing `out` (named `out_name`), and `again`, its flags once an attempt left `out` there.
    `contents(out)` is what two runs must agree on, and raises when `out` is not whole; `state(out)` names
    what a kill left."""
    name: str
    out_name: str
    command: Callable[[Path], list[str]]
    again: list[str]
    contents: Callable[[Path], dict]
    state: Callable[[Path], str]


def slm(*argv) -> list[str]:
    return [sys.executable, "-m", "slm", *map(str, argv)]


def file_bytes(out: Path) -> dict:
    """Every file's bytes; a killed process's temporaries, hidden, are not the output."""
    return {file.relative_to(out).as_posix(): file.read_bytes()
            for file in sorted(out.rglob("[!.]*") if out.is_dir() else [out]) if file.is_file()}


def prepared(out: Path) -> dict:
    read_meta(out)  # the sizes meta.json promises
    return file_bytes(out)


def finetuned(out: Path) -> dict:
    """What two fine-tunes of the same recipe agree on: weights, recipe, config and each step's losses
    (metrics.jsonl also records the resumes, and the checkpoints' trainer state holds RNG states by device)."""
    for folder in checkpoints(out):
        checkpoint.verify(folder)
    weights = {(folder.relative_to(out).as_posix(), name): (t.dtype, t.shape, t.numpy().tobytes())
               for folder in checkpoints(out) for name, t in load_file(folder / checkpoint.WEIGHTS).items()}
    losses = {(r["step"], key): r[key] for r in read_metrics(out / "metrics.jsonl")
              for key in ("loss", "val_loss") if key in r}
    return {"weights": weights, "losses": losses, **{name: (out / name).read_bytes()
                                                   for name in ("config.toml", "finetune.json")}}


def checkpoints(run: Path) -> list[Path]:
    return [folder for folder in [run / "best", run / "last", *sorted((run / "history").glob("step-*"))]
            if folder.exists()]


def whole_or_absent(out: Path) -> str:
    return "complete" if out.exists() else "absent"


def instructions(out: Path) -> dict:
    return {name: (out.parent / name).read_bytes() for name in (out.name, PROMPTS)}


def instructions_state(out: Path) -> str:
    return " + ".join(name for name in (out.name, PROMPTS) if (out.parent / name).exists()) or "absent"


def newest_checkpoint(run: Path) -> str:
    steps = [checkpoint.manifest_field(folder, "step") for folder in checkpoints(run)]
    return f"checkpoint at step {max(steps)}" if steps else ("run, no checkpoint" if run.exists() else "absent")


def stages(folder: Path, base_run: Path) -> dict[str, Stage]:
    """The four stages on test-sized inputs, built in `folder`; finetune and export start from `base_run`."""
    corpus = folder / "stories.txt"
    corpus.write_text("\n<|endoftext|>\n".join(list(demo_documents("train")) * 2) + "\n")  # 19k stories, 15 MB
    chat = write_conversations(folder / "chat.jsonl", 200, seed=0)
    return {
        "prepare": Stage("prepare", "data", lambda out: slm("prepare", corpus, "--out", out, "--val-fraction", "0.1"),
                         ["--force"], prepared, whole_or_absent),
        "make-instructions": Stage(
            "make-instructions", "chat.jsonl",
            lambda out: slm("make-instructions", corpus, "--out", out, "--prompts-out", out.with_name(PROMPTS),
                            "--held-out", "0.1", "--epochs", "2", "--max-stories", "3000"),
            ["--force"], instructions, instructions_state),
        "finetune": Stage("finetune", "run",
                          lambda out: slm("finetune", base_run, "--data", chat, "--out", out, *FINETUNE_FLAGS),
                          ["--resume"], finetuned, newest_checkpoint),
        "export hf": Stage("export hf", "hf", lambda out: slm("export", base_run, "--out", out), ["--force"],
                           file_bytes, whole_or_absent),
        "export gguf": Stage("export gguf", "model.gguf",
                             lambda out: slm("export", base_run, "--format", "gguf", "--out", out),
                             ["--force"], file_bytes, whole_or_absent),
    }


def timed_run(command: list[str], out: Path) -> tuple[float, float]:
    """Run `command` to the end; (seconds until it began writing `out` or a temporary beside it, seconds in all)."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    began = None
    while process.poll() is None:
        if began is None and writing(out):
            began = time.monotonic() - start
        time.sleep(0.01)
    assert process.returncode == 0, process.stderr.read()[-4000:]
    return began or 0.0, time.monotonic() - start


def writing(out: Path) -> bool:
    return bool(leftovers(out)) or out.exists()


def leftovers(out: Path) -> list[str]:
    """Temporaries of atomic_path beside `out`, or inside it where it is a folder."""
    places = [out.parent, out, *(p for p in out.rglob("*") if p.is_dir())] if out.is_dir() else [out.parent]
    return [str(p) for place in places for p in place.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def killed_anywhere(stage: Stage, folder: Path, kills: int, seed: int = 0) -> Counter:
    """Kill `stage` `kills` times, checking what each kill left, then let it finish; returns the states seen.
    Delays are drawn between the moments an uninterrupted run began writing and ended."""
    reference, out = folder / "reference" / stage.out_name, folder / "killed" / stage.out_name
    reference.parent.mkdir()
    out.parent.mkdir()
    began, took = timed_run(stage.command(reference), reference)
    expected = stage.contents(reference)
    rng = random.Random(f"{seed}:{stage.name}")
    states = Counter()
    for attempt in range(kills):
        process = subprocess.Popen(stage.command(out) + (stage.again if out.exists() else []),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.9 * began, took))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        state = stage.state(out)
        if stage.name == "finetune" and out.exists():
            stage.contents(out)  # every checkpoint verifies
        elif state != "absent":
            assert stage.contents(out) == expected, f"kill {attempt + 1} left {out} half-written ({state})"
        if process.returncode != -signal.SIGKILL:
            state += " (finished first)"
            for path in out.parent.iterdir():  # else a --resume finds nothing to do: the next attempt starts afresh
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif any(name.endswith(f"-{process.pid}") for name in leftovers(out)):
            state += ", killed mid-write"
        states[state] += 1
    last = subprocess.run(stage.command(out) + (stage.again if out.exists() else []), capture_output=True, text=True)
    assert last.returncode == 0, last.stderr[-4000:]
    assert stage.contents(out) == expected, f"the run after {kills} kills differs from the one never stopped"
    assert not leftovers(out), leftovers(out)
    return states


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_run):
    return stages(tmp_path_factory.mktemp("inputs"), tiny_run)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prepare", "make-instructions", "finetune", "export hf", "export gguf"])
def test_a_stage_killed_anywhere_leaves_its_output_whole_or_absent_and_a_rerun_finishes_it(inputs, tmp_path, name):
    states = killed_anywhere(inputs[name], tmp_path, KILLS)
    assert sum(states.values()) == KILLS
