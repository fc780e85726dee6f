"""`distgpt plot RUN_DIR [RUN_DIR ...]`: one PNG of the runs' metrics.jsonl, several runs on one
figure: train and val loss, learning rate, tokens/s and HellaSwag, against steps or tokens.

Reference lines (dashed) are drawn when given, e.g. the val loss and HellaSwag accuracy a
reproduction is aiming at. Values people compare with (llm.c's GPT-2 reproductions, FineWeb
val): 124M ends near val loss 3.28; OpenAI's GPT-2 scores HellaSwag acc_norm 0.294 (124M) and
0.489 (1558M)."""
import argparse
import json
from pathlib import Path

PANELS = (("loss", "train / val loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"),
          ("hellaswag_acc_norm", "HellaSwag acc_norm"))


def read_run(run_dir):
    """metrics.jsonl -> {metric: [(step, tokens, value)]}; a resumed run's re-logged steps keep
    their last value."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"plot: {run_dir} has no metrics.jsonl; give run directories (out_dir/name)")
    latest = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        for key, value in record.items():
            if key not in ("step", "tokens", "time") and isinstance(value, (int, float)):
                latest[(key, record["step"])] = (record.get("tokens", 0), value)
    series = {}
    for (key, step), (tokens, value) in sorted(latest.items()):
        series.setdefault(key, []).append((step, tokens, value))
    return series


def plot(run_dirs, out, x_axis="step", ref_val_loss=None, ref_hellaswag=None):
    import matplotlib  # a core dependency, imported here so the other commands start without it
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = [(Path(d).name, read_run(d)) for d in run_dirs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    index = 0 if x_axis == "step" else 1
    for ax, (metric, title) in zip(axes.flat, PANELS):
        for number, (name, series) in enumerate(runs):
            colour = f"C{number}"
            for key, style, label in ((metric, "-", name), ("val_loss" if metric == "loss" else None, "o-", f"{name} val")):
                points = series.get(key) if key else None
                if points:
                    ax.plot([p[index] for p in points], [p[2] for p in points], style, color=colour,
                            label=label, markersize=3, linewidth=1.2 if style == "-" else 1.6,
                            alpha=0.6 if key == "loss" else 1.0)
        reference = {"loss": ref_val_loss, "hellaswag_acc_norm": ref_hellaswag}.get(metric)
        if reference is not None:
            ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=f"reference {reference:g}")
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.set_title(title)
        ax.set_xlabel(x_axis)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(", ".join(name for name, _ in runs))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="distgpt plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (each holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png of the first run)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", dest="x_axis")
    p.add_argument("--ref-val-loss", type=float, default=None, help="dashed line on the loss panel, e.g. 3.28")
    p.add_argument("--ref-hellaswag", type=float, default=None, help="dashed line on the HellaSwag panel, e.g. 0.294")
    a = p.parse_args(argv)
    out = plot(a.runs, a.out or Path(a.runs[0]) / "metrics.png", a.x_axis, a.ref_val_loss, a.ref_hellaswag)
    print(f"wrote {out}")
    return 0
