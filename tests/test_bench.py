import contextlib
import io
import json
import re

import pytest

from slm.cli import main

FIGURES = ["prepare", "train", "KV cache, batch 1", "KV cache, batch 8", "recompute, batch 1",
           "recompute, batch 8", "peak memory"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[str, list]:
    """(the printed table, the saved result files) of one tiny bench run with --save."""
    results = tmp_path_factory.mktemp("results")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", "--preset", "tiny", "--steps", "2", "--device", "cpu", "--save",
                     "--results-dir", str(results)])
    assert code == 0
    return out.getvalue(), sorted(results.iterdir())


def test_the_table_prints_every_figure_as_a_positive_number(bench):
    table, _ = bench
    for name in FIGURES:
        line = next(line for line in table.splitlines() if name in line)
        value = re.search(r"\s([\d,]+) (tokens/s|MB)$", line)
        assert value and float(value.group(1).replace(",", "")) > 0, line
    assert "preset tiny on cpu (float32)" in table


def test_save_writes_the_figures_and_the_machine_as_json(bench):
    _, files = bench
    assert len(files) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d-tiny-cpu\.json", files[0].name)
    result = json.loads(files[0].read_text())
    assert result["preset"] == "tiny" and result["device"] == "cpu" and result["timed_steps"] == 2
    assert {"cpu", "cores", "torch", "python"} <= set(result["machine"])
    assert set(result["generate_tokens_per_s"]) == {"kv_cache_batch_1", "kv_cache_batch_8",
                                                    "recompute_batch_1", "recompute_batch_8"}
    figures = [result["prepare_tokens_per_s"], result["train_tokens_per_s"], result["peak_memory_mb"],
               *result["generate_tokens_per_s"].values()]
    assert all(figure > 0 for figure in figures)


def test_zero_steps_is_a_one_line_error(capsys):
    assert main(["bench", "--preset", "tiny", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm: error: --steps") and err.count("\n") == 1


def test_bench_generate_measures_generation_alone(capsys):
    assert main(["bench", "generate", "--preset", "tiny", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    for name in FIGURES[2:]:
        assert name in table
    assert "prepare:" not in table and "train:" not in table
