"""slm runs: each run's figures and status (finished, interrupted, running) from its files alone."""

import json
import os
import shutil
import subprocess
import sys

from slm.cli import main
from slm.runs.files import read_metrics
from slm.runs.listing import PID_FILE, Progress, duration, status


def copy_run(source, target, keep_records):
    """A copy of a run whose metrics.jsonl keeps only its first records, as a run stopped there leaves it."""
    shutil.copytree(source, target)
    records = read_metrics(source / "metrics.jsonl")[:keep_records]
    (target / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return target


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_completed_run_is_finished_and_leaves_no_pid_file(tiny_run):
    records = read_metrics(tiny_run / "metrics.jsonl")
    assert records[-1]["event"] == "finished" and records[-1]["step"] == 30
    assert not (tiny_run / PID_FILE).exists()
    assert status(tiny_run, records) == "finished"


def test_a_run_without_its_finished_record_is_interrupted_even_with_a_stale_pid(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "stopped", 16)
    (run / PID_FILE).write_text(str(dead_pid()))
    assert status(run, read_metrics(run / "metrics.jsonl")) == "interrupted"


def test_a_run_whose_training_process_lives_is_running(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "live", 16)
    (run / PID_FILE).write_text(str(os.getpid()))
    assert status(run, read_metrics(run / "metrics.jsonl")) == "running"


def test_progress_takes_the_best_evaluation_and_the_furthest_step():
    records = [{"step": 1, "loss": 5.0, "tokens_seen": 10, "wall_seconds": 1.0},
               {"step": 1, "val_loss": 4.0, "val_bpb": 1.5, "tokens_seen": 10},
               {"step": 2, "loss": 4.5, "tokens_seen": 20, "wall_seconds": 2.5},
               {"step": 2, "val_loss": 4.2, "val_bpb": 1.6, "tokens_seen": 20}]
    progress = Progress.of(records)
    assert (progress.steps, progress.tokens_seen, progress.wall_seconds) == (2, 20, 2.5)
    assert progress.best == records[1]
    assert Progress.of([]).best is None


def test_durations_read_as_minutes_or_hours():
    assert [duration(s) for s in (5, 125, 3600 * 2 + 61)] == ["0m05s", "2m05s", "2h01m"]


def test_slm_runs_lists_finished_and_interrupted_runs(tiny_run, tmp_path, capsys):
    folder = tmp_path / "runs"
    shutil.copytree(tiny_run, folder / "done")
    copy_run(tiny_run, folder / "nested" / "stopped", 16)
    assert main(["runs", str(folder)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("done", "nested"))}
    best = Progress.of(read_metrics(tiny_run / "metrics.jsonl")).best
    parameters = json.loads((tiny_run / "last" / "manifest.json").read_text())["parameters"]
    assert rows["done"][1:5] == ["tiny", f"{parameters / 1e6:.2f}M", "30", "7,680"]
    assert rows["done"][5:7] == [f"{best['val_loss']:.4f}", f"{best['val_bpb']:.4f}"]
    assert rows["done"][-1] == "finished"
    assert rows["nested/stopped"][-1] == "interrupted" and rows["nested/stopped"][3] == "15"


def test_a_folder_without_runs_is_a_one_line_error(tmp_path, capsys):
    for folder in (tmp_path, tmp_path / "missing"):
        assert main(["runs", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("slm: error: ") and err.count("\n") == 1
        assert ("no runs under" if folder.exists() else "is not a folder") in err


def test_slm_runs_reads_a_run_without_importing_torch(tiny_run):
    code = ("import sys; from slm.cli import main; assert main(['runs', sys.argv[1]]) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_run)], capture_output=True, text=True, check=True)
    assert "finished" in out.stdout
