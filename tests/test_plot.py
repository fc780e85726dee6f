"""`distgpt plot`: a PNG of several runs' metrics, with reference lines."""
import json
import struct

from pathlib import Path

import matplotlib.image
import pytest

from distgpt import cli, plot


def write_run(run_dir, steps, scale, val_every=10):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": scale * (10 - 6 * step / steps), "lr": 6e-4 * min(1, step / 10),
                                "tokens_per_s": 1000.0 + step, "tokens": step * 1024, "time": 0.0}) + "\n")
            if step % val_every == 0:
                f.write(json.dumps({"step": step, "val_loss": scale * (10.2 - 6 * step / steps), "tokens": step * 1024}) + "\n")
                f.write(json.dumps({"step": step, "hellaswag_acc_norm": 0.25 + step / 1000, "tokens": step * 1024}) + "\n")


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plot_draws_several_runs_with_reference_lines(tmp_path, capsys):
    write_run(tmp_path / "a", 60, 1.0)
    write_run(tmp_path / "b", 40, 0.9)
    out = tmp_path / "both.png"
    assert cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out),
                     "--ref-val-loss", "3.28", "--ref-hellaswag", "0.294"]) == 0
    assert png_size(out) == (1200, 800)
    image = matplotlib.image.imread(str(out))
    assert image.std() > 0.05  # lines, text and axes, not a blank canvas
    assert "wrote" in capsys.readouterr().out


def test_plot_reads_the_last_value_of_a_re_logged_step(tmp_path):
    write_run(tmp_path / "r", 20, 1.0)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # a resume re-logs step 20
        f.write(json.dumps({"step": 20, "loss": 1.5, "tokens": 20 * 1024}) + "\n")
    series = plot.read_run(tmp_path / "r")
    assert [s for s, _, _ in series["loss"]] == list(range(1, 21)) and series["loss"][-1][2] == 1.5
    assert series["val_loss"][-1] == (20, 20 * 1024, pytest.approx(1.0 * (10.2 - 6)))


def test_plot_of_a_directory_without_metrics_is_one_line(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl" in err[0]


def test_plot_needs_nothing_beyond_the_plain_install():
    """`pip install distgpt` (no extras) must bring matplotlib: plot is a core command."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    core = [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert "matplotlib" in core
    assert not any(d.startswith("matplotlib") for extra in project["optional-dependencies"].values() for d in extra)
