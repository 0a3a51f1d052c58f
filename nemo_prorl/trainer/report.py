"""End-of-run summary: validation before/after as a table, and a PNG of the training curves (also sent to the
experiment trackers after each validation: `validation_report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nemo_prorl.trainer.logger import read_jsonl

CURVES = [
    ("reward/mean", "train reward"),
    ("val/pass@1", "validation pass@1"),
    ("actor/entropy", "entropy"),
    ("actor/kl", "KL to reference"),
    ("response_length/mean", "response length"),
    ("actor/clip_frac", "clip fraction"),
]


def read_metrics(path: Path) -> list[dict[str, float]]:
    return read_jsonl(path)[0]  # a torn last line (a kill mid-write) is left out


def before_after_table(before: dict[str, float], after: dict[str, float], keys: Sequence[str]) -> str:
    rows = [f"{'metric':<16}{'before':>10}{'after':>10}{'change':>10}"]
    for k in keys:
        if k in before and k in after:
            b, a = before[k], after[k]
            rows.append(f"{k.removeprefix('val/'):<16}{b:>10.3f}{a:>10.3f}{a - b:>+10.3f}")
    return "\n".join(rows)


def plot_curves(records: list[dict[str, float]], out_png: Path, title: str) -> Path:
    """A Figure of its own on the Agg canvas, not pyplot: pyplot's global figure state is not thread-safe,
    and the trackers' thread plots while the training thread may too (the end-of-run summary)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for ax, (key, label) in zip(axes.flat, CURVES):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key.startswith("val/") else None, ms=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return out_png


def validation_report(out_dir: Path, step: int, title: str) -> list[tuple[str, tuple]]:
    """The curves PNG and the before/after table of the validations so far (the first against the
    latest), written to <out_dir>/report/, as log_artifact items for the trackers."""
    rows = read_metrics(out_dir / "metrics.jsonl")
    folder = out_dir / "report"
    folder.mkdir(exist_ok=True)
    items: list[tuple[str, tuple]] = [("log_artifact", (plot_curves(rows, folder / "training_curves.png", title),
                                                         step))]
    vals = [r for r in rows if any(k.startswith("val/") for k in r)]
    if vals:
        first, last = vals[0], vals[-1]
        keys = sorted((k for k in last if k.startswith("val/pass@")), key=lambda k: int(k.split("@")[1])
                      if k.split("@")[1].isdigit() else 0) + ["val/reward", "val/response_length"]
        table = folder / "pass_at_k.txt"
        table.write_text(f"validation, step {first['step']} -> step {last['step']}\n"
                         + before_after_table(first, last, keys) + "\n")
        items.append(("log_artifact", (table, step)))
    return items
