"""The package layout is the architecture (issue 29), as tested properties: the size of every module and
function, the library's line ceiling, and which packages may import which. Each checker takes the source tree
as an argument, so that it is also run on a small tree built to break every rule."""

import ast
import sys
from pathlib import Path

import slm

SRC = Path(slm.__file__).parent
MODULE_LINES = 400
FUNCTION_LINES = 60
# The library's line ceiling, as tinygrad keeps one: raised only by the commit of a feature that needs the
# lines, by what it adds. Issue 29 set it at 7,822, the lines of src/slm/**/*.py at commit c094839 before the
# reorganization (splitting modules added import lines, which the library paid for elsewhere); issue 28's
# reading of short and long requests, its name guard, the best-of answer at a time limit and the topic of a
# listing request raised it to 7,940; its end-of-text push as the token budget runs out, its reading of a
# sentence-initial verb and best-of-N candidates picked in one call (SharedPick, top-p among 256 candidates:
# 1.83 -> 1.49 s an answer) to 8,002; its greedy best-of (candidate_settings) and two-letter names to 8,022,
# its reading of an ask for a sentence in the words before it to 8,031; a word's wait for a spot as good as
# one it passed by (logit_bias.apply_all) to 8,043; the request reader's lists after any cue, and the
# labels, time words and audiences it leaves out, to 8,055; the serve app's model loaded on a passing thread,
# so no OpenMP pool throttles the worker's (3.7 -> 1.8 s a best-of-4 answer), to 8,070; issue 30's
# kill-anywhere fixes (every atomic write clears what a killed writer left, a fine-tune killed before its
# first checkpoint resumes by starting again) to 8,079; the fuzzer's finds (a sampling number too small to
# sample with, a body not in UTF-8: one-line 400s) to 8,091; that check moved to the settings every command
# shares, a make-instructions rerun putting back the same prompts, a train --resume before any checkpoint
# starting again, to 8,099; `slm bench`'s measured limits (slm.peak: GEMM peaks at the models' shapes, read
# bandwidths, each speed's share of them) and llama.cpp's q8_0 row in a process of its own (slm.peers), to 8,279;
# one `started` check for train and fine-tune resumes, one head_rows for the limits' counts, to 8,288.
LIBRARY_LINES = 8288
STAGES = ("data", "model", "training", "inference", "assistant", "serve", "interop", "runs")
ON_TOP = ("slm.cli", "slm.pipelines", "slm.bench", "slm.peers")  # they chain the stages, so no stage may import them
MODEL_MAY_IMPORT = ("torch", "slm.config", "slm.model")
# What each stage's __init__ docstring says it must not import (the model's rule is MODEL_MAY_IMPORT's).
MUST_NOT_IMPORT = {"data": {"training", "inference", "assistant", "serve", "interop"},
                   "training": {"assistant", "serve", "interop"},
                   "inference": {"training", "assistant", "serve", "interop"},
                   "assistant": {"serve", "interop"},
                   "serve": {"training"},
                   "interop": {"training", "inference", "assistant", "serve"},
                   "runs": set(STAGES) - {"runs", "model"}}


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at `root`, by its dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def long_modules(root: Path, limit: int = MODULE_LINES) -> dict[str, int]:
    return {name: n for name, path in modules(root).items() if (n := line_count(path)) > limit}


def long_functions(root: Path, limit: int = FUNCTION_LINES) -> dict[str, int]:
    """Functions and methods (nested ones too) of more than `limit` lines, from `def` to their last line."""
    found = {}
    for name, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > limit:
                    found[f"{name}.{node.name} (line {node.lineno})"] = n
    return found


def library_lines(root: Path) -> int:
    return sum(line_count(path) for path in modules(root).values())


def imports(name: str, path: Path) -> set[str]:
    """The modules `name` imports anywhere in its code, at the top or inside a function; `from P import x`
    counts as P.x as well as P, since x may be a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            source = ".".join(part for part in (base, node.module or "") if part)
            found |= {source} | {f"{source}.{alias.name}" for alias in node.names}
    return found


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "slm" and parts[1] in STAGES else None


def upward_imports(root: Path) -> dict[str, set[str]]:
    """Modules of a stage that import the command line or what sits on top of the stages."""
    found = {}
    for name, path in modules(root).items():
        up = {m for m in imports(name, path) if m in ON_TOP or m.startswith(tuple(f"{top}." for top in ON_TOP))}
        if stage(name) and up:
            found[name] = up
    return found


def model_imports(root: Path) -> dict[str, set[str]]:
    """What the model package imports beyond torch, the standard library and slm.config."""
    found = {}
    for name, path in modules(root).items():
        if stage(name) == "model":
            outside = {m for m in imports(name, path) if m.split(".")[0] not in sys.stdlib_module_names
                       and not any(m == allowed or m.startswith(allowed + ".") for allowed in MODEL_MAY_IMPORT)}
            if outside:
                found[name] = outside
    return found


def stage_graph(root: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {s: set() for s in STAGES}
    for name, path in modules(root).items():
        if (own := stage(name)) is not None:
            graph[own] |= {other for m in imports(name, path) if (other := stage(m)) not in (None, own)}
    return graph


def forbidden_imports(root: Path) -> dict[str, set[str]]:
    """The stages each stage imports against MUST_NOT_IMPORT."""
    graph = stage_graph(root)
    return {s: graph[s] & banned for s, banned in MUST_NOT_IMPORT.items() if graph[s] & banned}


def stage_cycle(root: Path) -> list[str] | None:
    """A cycle of imports between the stage packages, as the path that closes it, or None."""
    graph, done = stage_graph(root), set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for after in sorted(graph[node]):
            if cycle := visit(after, path + [node]):
                return cycle
        done.add(node)
        return None

    return next((cycle for s in STAGES if (cycle := visit(s, []))), None)


def test_no_module_is_over_its_line_budget():
    assert len(modules(SRC)) > 40
    assert not long_modules(SRC), f"over {MODULE_LINES} lines, split by concept: {long_modules(SRC)}"


def test_no_function_is_over_its_line_budget():
    assert not long_functions(SRC), f"over {FUNCTION_LINES} lines, split into named steps: {long_functions(SRC)}"


def test_the_library_stays_within_its_line_ceiling():
    assert library_lines(SRC) <= LIBRARY_LINES, f"{library_lines(SRC):,} lines; the ceiling is {LIBRARY_LINES:,}"


def test_no_stage_imports_the_command_line_or_what_sits_on_top():
    assert not upward_imports(SRC)


def test_the_model_imports_only_torch_the_standard_library_and_the_config():
    assert imports("slm.model.gpt", SRC / "model" / "gpt.py") >= {"torch", "slm.config"}
    assert not model_imports(SRC)


def test_each_stage_imports_none_of_what_its_docstring_forbids():
    for name, banned in MUST_NOT_IMPORT.items():
        said = (SRC / name / "__init__.py").read_text(encoding="utf-8")
        assert all(other in said for other in banned - {"model"}), f"slm.{name}'s docstring names its rule"
    assert not forbidden_imports(SRC)


def test_the_stages_import_each_other_without_a_cycle():
    assert stage_graph(SRC)["assistant"] >= {"data", "inference", "training"}  # the graph sees real imports
    assert stage_cycle(SRC) is None, f"import cycle between stages: {' -> '.join(stage_cycle(SRC))}"


def test_every_checker_finds_what_breaks_its_rule(tmp_path):
    root = tmp_path / "slm"
    files = {
        "__init__.py": "",
        "cli.py": "",
        "model/__init__.py": "",
        "model/gpt.py": "import numpy\nfrom slm.config import Config\nfrom ..data import windows\n",
        "data/__init__.py": "",
        "data/windows.py": "def f():\n    from slm import cli\n" + "    x = 1\n" * 60 + "from slm.runs import files\n",
        "training/__init__.py": "",
        "training/loop.py": "from slm.data.windows import f\n" + "\n" * 400,
        "runs/__init__.py": "",
        "runs/files.py": "from slm.training import loop\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert set(long_modules(root)) == {"slm.training.loop"}
    assert list(long_functions(root)) == ["slm.data.windows.f (line 1)"]
    assert library_lines(root) == 3 + 63 + 401 + 1
    assert upward_imports(root) == {"slm.data.windows": {"slm.cli"}}
    assert model_imports(root) == {"slm.model.gpt": {"numpy", "slm.data", "slm.data.windows"}}
    assert stage_cycle(root) == ["data", "runs", "training", "data"]
    assert forbidden_imports(root) == {"runs": {"training"}}
