"""End-of-run summary: validation before/after as a table, and a PNG of the training curves."""

from __future__ import annotations

import json
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
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
    plt.close(fig)
    return out_png
