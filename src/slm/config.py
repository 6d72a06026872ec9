"""One typed configuration for a run: model shape and training settings.

Precedence, later wins: field defaults < `--preset NAME` < `--config FILE.toml` < command-line flags.
Every field is also a flag (`n_layer` -> `--n-layer`); its help text lives here once and feeds `--help`,
the TOML files written into each run, and the table in docs/training.md. This module never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from slm.errors import SlmError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE = ("auto", "on", "off")
OPTIMIZERS = ("adamw", "muon")
DECAYS = ("cosine", "linear")
WINDOW_ORDERS = ("random", "shuffled")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise SlmError(f"--{name.replace('_', '-')} must be positive (got {value}) in [{section}]")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = _help("number of token ids the model can read and predict (GPT-2: 50257)", 50257)
    block_size: int = _help("context length in tokens", 128)
    n_layer: int = _help("number of transformer blocks", 4)
    n_head: int = _help("attention heads per block; must divide n_embd", 4)
    n_embd: int = _help("width of the residual stream (embedding size)", 256)
    dropout: float = _help("dropout probability on embeddings, attention and residual branches", 0.0)
    bias: bool = _help("use biases in linear layers and layer norms, as GPT-2 does", True)
    vocab_head: int = _help("score only the K most frequent ids of the training data plus one 'other' class "
                            "(an exact distribution over all ids; much faster on CPUs); 0: the full head", 0)

    def __post_init__(self) -> None:
        _positive("model", vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                  n_head=self.n_head, n_embd=self.n_embd)
        if self.n_embd % self.n_head:
            raise SlmError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head}); "
                           f"try --n-head {max(d for d in range(1, self.n_head + 1) if self.n_embd % d == 0)}")
        if not 0 <= self.vocab_head < self.vocab_size:
            raise SlmError(f"--vocab-head must be 0 (full head) or between 1 and {self.vocab_size - 1} "
                           f"(got {self.vocab_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise SlmError(f"--dropout must be in [0, 1) (got {self.dropout})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class TrainConfig:
    data: str = _help("folder made by `slm prepare` (train.bin, validation.bin, meta.json)", "")
    batch_size: int = _help("sequences per optimizer step, over all processes", 32)
    micro_batch_size: int = _help("sequences per forward pass; batch_size must be a multiple of it", 32)
    learning_rate: float = _help("peak learning rate, reached at the end of warm-up", 1e-3)
    min_learning_rate: float = _help("floor the decay ends at; at most learning_rate", 1e-4)
    decay: str = _help(f"shape of the learning rate's decay after warm-up: one of {', '.join(DECAYS)}", "cosine")
    warmup_steps: int = _help("optimizer steps of linear warm-up from 0 to learning_rate", 100)
    windows: str = _help(f"how training windows are drawn: one of {', '.join(WINDOW_ORDERS)} (random: each anywhere, "
                         "independently, as nanoGPT does; shuffled: each pass over the data cuts it into windows "
                         "at a random offset and visits every one once, in random order)", "shuffled")
    optimizer: str = _help(f"one of {', '.join(OPTIMIZERS)} (muon: Muon for the blocks' weight matrices, AdamW for "
                           "embeddings, head, norms and biases)", "adamw")
    # 5e-3: the best of 2e-3, 5e-3 and 1e-2 on the cpu preset in 2 minutes. Keller Jordan's lr 0.02 under his
    # scaling moves a weight as far as about 6e-3 does on this scale for a matrix of 256 inputs, 3.6e-3 for 768.
    muon_learning_rate: float = _help("Muon's peak learning rate, on AdamW's scale (each update's RMS is 0.2 x it); "
                                      "it follows learning_rate's warm-up and decay", 5e-3)
    muon_momentum: float = _help("Muon's momentum (Nesterov)", 0.95)
    weight_decay: float = _help("weight decay, applied to weight matrices only (AdamW's and Muon's)", 0.1)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.95)
    grad_clip: float = _help("clip the global gradient norm to this value (0: no clipping)", 1.0)
    max_steps: int = _help("stop after this many optimizer steps", 2000)
    max_tokens: int = _help("stop after this many training tokens (0: no token limit)", 0)
    max_minutes: float = _help("stop after this many minutes of training; the LR then decays over "
                               "the time budget (0: no time limit)", 0.0)
    instruct_share: float = _help("share of training rows that are a whole story preceded by a request it "
                                  "satisfies (instruction-conditioned pretraining; the loss skips the request)", 0.0)
    eval_interval: int = _help("evaluate, print a sample and save checkpoints every this many steps", 200)
    eval_batches: int = _help("validation micro-batches per evaluation (a fixed set, the same every time)", 20)
    sample_tokens: int = _help("tokens of the sample printed at each evaluation (0: none)", 48)
    seed: int = _help("seed for initialisation, data order and dropout; same seed, same run", 1337)
    device: str = _help(f"where to train: one of {', '.join(DEVICES)} (auto: CUDA, then MPS, then CPU)", "auto")
    dtype: str = _help(f"compute precision: one of {', '.join(DTYPES)} (auto: bfloat16 on CUDA if "
                       "supported, else float16 there; bfloat16 on CPUs with native bf16 (AVX-512 BF16 or AMX); "
                       "float32 elsewhere)", "auto")
    compile: str = _help(f"torch.compile the model: one of {', '.join(COMPILE)} (auto: on CUDA only; on a "
                         "CPU it measured slower, see benchmarks/README.md)", "auto")
    fsdp: bool = _help("under torchrun, shard parameters, gradients and optimizer state (Muon's momentum stays "
                       "whole) over the processes (FSDP2 fully_shard) instead of replicating them (DDP)", False)
    collective_timeout: float = _help("seconds a process waits in a collective (all-reduce, barrier) for the "
                                      "others before the run stops with an error: a stopped or hung process "
                                      "cannot make a multi-process run hang for ever", 600.0)
    keep_checkpoints: int = _help("resumable checkpoints kept: RUN/last plus the newest older ones in "
                                  "RUN/history (RUN/best is kept besides)", 2)
    max_bad_steps: int = _help("stop after this many optimizer steps in a row with a non-finite loss or "
                               "gradient (each is skipped)", 5)
    tensorboard: bool = _help("also log the scalars and evaluation samples for TensorBoard, in RUN/tb "
                              "(view them with: tensorboard --logdir runs)", False)

    def __post_init__(self) -> None:
        _positive("train", batch_size=self.batch_size, micro_batch_size=self.micro_batch_size,
                  learning_rate=self.learning_rate, muon_learning_rate=self.muon_learning_rate,
                  max_steps=self.max_steps,
                  eval_interval=self.eval_interval, eval_batches=self.eval_batches,
                  keep_checkpoints=self.keep_checkpoints, max_bad_steps=self.max_bad_steps,
                  collective_timeout=self.collective_timeout)
        if self.batch_size % self.micro_batch_size:
            raise SlmError(f"--batch-size ({self.batch_size}) must be a multiple of --micro-batch-size "
                           f"({self.micro_batch_size})")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise SlmError(f"--min-learning-rate ({self.min_learning_rate}) must be between 0 and "
                           f"--learning-rate ({self.learning_rate})")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "max_tokens", "max_minutes", "sample_tokens"):
            if getattr(self, name) < 0:
                raise SlmError(f"--{name.replace('_', '-')} must not be negative (got {getattr(self, name)})")
        if not 0 <= self.instruct_share <= 1:
            raise SlmError(f"--instruct-share must be between 0 and 1 (got {self.instruct_share})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise SlmError(f"--beta1 and --beta2 must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if not 0 <= self.muon_momentum < 1:
            raise SlmError(f"--muon-momentum must be in [0, 1) (got {self.muon_momentum})")
        for name, choices in (("decay", DECAYS), ("windows", WINDOW_ORDERS), ("optimizer", OPTIMIZERS),
                              ("device", DEVICES), ("dtype", DTYPES), ("compile", COMPILE)):
            if getattr(self, name) not in choices:
                raise SlmError(f"--{name} must be one of {', '.join(choices)} (got {getattr(self, name)!r})")

    def micro_batches(self, processes: int) -> int:
        """Micro-batches each of `processes` runs per optimizer step (gradient accumulation)."""
        return self.batch_size // (self.micro_batch_size * processes)


# Train fields a resumed run may change: budgets, reporting and placement. Everything else would make the
# resumed run a different run, so changing it on --resume is an error.
RESUMABLE_CHANGES = frozenset({"data", "max_steps", "max_tokens", "max_minutes", "eval_interval", "eval_batches",
                               "sample_tokens", "device", "dtype", "compile", "fsdp", "collective_timeout",
                               "keep_checkpoints", "max_bad_steps", "tensorboard"})


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        """TOML with each field's help as a comment; `slm train --config` reads it back as is."""
        lines = []
        for section in fields(self):
            lines.append(f"[{section.name}]")
            for f in fields(getattr(self, section.name)):
                lines.append(f"# {f.metadata['help']}")
                lines.append(tomli_w.dumps({f.name: getattr(getattr(self, section.name), f.name)}).strip())
            lines.append("")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """A config that a run saved: a field it lacks, it ran with that field's value from before the field."""
        data = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
        for (section, name), before in ADDED_FIELDS.items():
            if isinstance(values := data.setdefault(section, {}), dict):
                values.setdefault(name, before)
        return merge(cls(), data, source)


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig}
# Fields added since runs were first saved, with the value that reproduces runs saved without them (where
# that is not the field's default).
ADDED_FIELDS: dict[tuple[str, str], Any] = {("train", "windows"): "random"}
# Values that older runs saved and that mean something else now: (section, field, old value) -> new value.
RENAMED_VALUES: dict[tuple[str, str, Any], Any] = {("train", "compile", True): "on", ("train", "compile", False): "off"}


def merge(cfg: Config, layer: dict[str, Any], source: str) -> Config:
    """Apply one layer of settings ({section: {field: value}}) over cfg; unknown keys are errors."""
    updated = {}
    for section, values in layer.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise SlmError(f"unknown section [{section}] in {source}; expected {', '.join(SECTIONS)}")
        known = {f.name: f for f in fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in known:
                raise SlmError(f"unknown field {key!r} in [{section}] of {source}; "
                               f"known fields: {', '.join(known)}")
            values[key] = _coerce(RENAMED_VALUES.get((section, key, value), value), known[key], source)
        updated[section] = dataclasses.replace(getattr(cfg, section), **values)
    return dataclasses.replace(cfg, **updated)


def _coerce(value: Any, f: dataclasses.Field, source: str) -> Any:
    kind = _field_type(f)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SlmError(f"{f.name} in {source} must be a {kind.__name__} (got {value!r})")
    return value


def _field_type(f: dataclasses.Field) -> type:
    name = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "bool": bool, "str": str}[name]


def check_resume_changes(saved: Config, asked: Config) -> None:
    """On --resume the architecture and the optimisation come from the checkpoint; a flag that conflicts
    with them is an error rather than a silently different run."""
    conflicts = []
    for section in SECTIONS:
        for f in fields(SECTIONS[section]):
            old, new = getattr(getattr(saved, section), f.name), getattr(getattr(asked, section), f.name)
            if old != new and not (section == "train" and f.name in RESUMABLE_CHANGES):
                conflicts.append(f"--{f.name.replace('_', '-')} {new} (the run has {old})")
    if conflicts:
        raise SlmError(f"cannot resume with {', '.join(conflicts)}: on --resume these come from the checkpoint; "
                       f"drop those flags or start a new run with another --out")


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("slm.presets").iterdir()
                  if p.name.endswith(".toml"))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SlmError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SlmError(f"config file {path} is not valid TOML: {err}") from None


def load_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise SlmError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return tomllib.loads(resources.files("slm.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8"))


def resolve(preset: str | None = None, toml_path: str | Path | None = None,
            flags: dict[str, dict[str, Any]] | None = None, base: Config | None = None) -> Config:
    """Defaults < preset < TOML file < flags. `flags` is {section: {field: value}} of flags actually given."""
    cfg = base or Config()
    if preset:
        cfg = merge(cfg, load_preset(preset), f"preset {preset!r}")
    if toml_path:
        cfg = merge(cfg, read_toml(toml_path), str(toml_path))
    if flags:
        cfg = merge(cfg, flags, "the command line")
    return cfg


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = ("model", "train"),
                     exclude: tuple[str, ...] = ()) -> None:
    """Every field of the chosen sections, except those in `exclude`, becomes a flag whose default is
    'not given'."""
    for section in sections:
        group = parser.add_argument_group(f"{section} config (defaults < --preset < --config < flags)")
        for f in (f for f in fields(SECTIONS[section]) if f.name not in exclude):
            kind = _field_type(f)
            flag = "--" + f.name.replace("_", "-")
            common = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                      "help": f"{f.metadata['help']} (default: {f.default})"}
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
            else:
                group.add_argument(flag, type=kind, metavar=f.name.upper(), **common)


# ---- the arguments several commands share, declared once so that a flag means one thing everywhere ----------

def add_config_source(p: argparse.ArgumentParser) -> None:
    """--preset and --config: the layers `resolve` puts under the config flags."""
    p.add_argument("--preset", choices=preset_names(), help="start from a named preset")
    p.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (over the preset)")


def add_run_out(p: argparse.ArgumentParser, verb: str) -> None:
    """--out, --resume, --force and --nproc of a command that trains a run (train, finetune)."""
    p.add_argument("--out", required=True, help="run folder to write: checkpoints, config.toml, metrics.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint (same command line + --resume)")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.add_argument("--nproc", type=int, default=0,
                   help=f"{verb} on this many processes of this machine: runs this command under torchrun")


def add_checkpoint_choice(p: argparse.ArgumentParser,
                          run: str | None = "run folder written by `slm train` or `slm finetune`") -> None:
    """The RUN argument with this help (none when run is None) and --checkpoint, read by checkpoint_dir."""
    if run:
        p.add_argument("run", help=run)
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint to load: best (lowest validation loss) or last (newest) (default: best)")


def add_placement(p: argparse.ArgumentParser) -> None:
    """--device and --dtype of a command that loads a model: device.pick_device and pick_dtype read them."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="compute precision (default: auto: bfloat16 "
                   "on CUDA and on CPUs with native bf16, float32 elsewhere)")


def flags_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Collect the config flags the user actually gave, as {section: {field: value}}."""
    given: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        section, _, name = dest.partition(".")
        if name and section in SECTIONS:
            given.setdefault(section, {})[name] = value
    return given


def config_table() -> str:
    """Markdown table of every field, for docs/training.md."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            rows.append(f"| `--{f.name.replace('_', '-')}` | `{f.default}` | {f.metadata['help']} |")
    return "\n".join(rows)
