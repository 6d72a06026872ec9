"""slm plot: one line per series and run, an image of the promised size, and clear errors on bad metrics."""

import json
import struct

import pytest

from slm.cli import main
from slm.runs.plot import CURVES, DPI, FIGSIZE, curves_figure, read_run


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])  # the IHDR chunk: width, height


def lines_per_panel(fig):
    """Line counts by row of panels, the columns side by side (subplots lists the axes row by row)."""
    return [[len(ax.get_lines()) for ax in fig.axes[i:i + 2]] for i in range(0, len(fig.axes), 2)]


def test_two_runs_overlaid_draw_each_series_once_per_run_against_steps_and_tokens(tiny_run):
    records = read_run(tiny_run)
    fig = curves_figure({"a": records, "b": records})
    # rows: loss (training + validation), validation bits per byte, learning rate, tokens/s; columns: steps, tokens
    assert lines_per_panel(fig) == [[4, 4], [2, 2], [2, 2], [2, 2]]
    loss = fig.axes[0].get_lines()
    assert [len(line.get_xdata()) for line in loss] == [30, 2, 30, 2]  # 30 steps, evaluations at 15 and 30
    assert [text.get_text() for text in fig.axes[0].get_legend().get_texts()] == ["a", "b"]


def test_slm_plot_writes_an_image_of_the_figure_size(tiny_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(tiny_run), str(tiny_run / "metrics.jsonl"), "--out", str(out)]) == 0
    assert png_size(out) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    assert "plotted 2 run(s)" in capsys.readouterr().out


def test_training_refreshes_the_runs_own_curves_image(tiny_run):
    assert png_size(tiny_run / CURVES) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))


def test_a_last_line_cut_short_by_a_kill_is_skipped(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    text = (tiny_run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + '{"step": 31, "lo')
    assert len(read_run(run)) == len(text.splitlines())


@pytest.mark.parametrize("content, message", [
    ("", "records no training step yet"),
    (json.dumps({"event": "resumed", "step": 0}) + "\n", "records no training step yet"),
    ('{"step": 1, "loss": 10.0}\nnot json\n{"step": 2, "loss": 9.0}\n', "line 2, is not a JSON object"),
    ('{"step": 1, "loss": 10.0}\n[1, 2]\n', "line 2, is not a JSON object"),
])
def test_an_empty_or_malformed_metrics_file_is_one_line_error(tmp_path, capsys, content, message):
    (tmp_path / "metrics.jsonl").write_text(content)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["plot", "{tmp}/missing", "--out", "{tmp}/x.png"], "does not exist"),
    (["plot", "{tmp}", "--out", "{tmp}/x.png"], "has no metrics.jsonl"),
    (["plot", "{run}", "--out", "{tmp}/x.unknown"], "matplotlib cannot write .unknown"),
    (["plot", "{run}", "--out", "{tmp}/nowhere/x.png"], "does not exist"),
])
def test_bad_plot_arguments_are_one_line_errors(tmp_path, tiny_run, capsys, argv, message):
    assert main([a.format(tmp=tmp_path, run=tiny_run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm: error: ") and message in err and err.count("\n") == 1
