"""Evaluation output: the terminal table and the PNG of pass@k curves (one line per checkpoint, one panel
per domain plus the overall one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _row(name: str, domain: str, stats: dict[str, Any], ks: Sequence[int]) -> str:
    cells = "".join(f"{stats['pass@k'][str(k)]:>10.3f}" for k in ks)
    return (f"{name:<26}{domain:<22}{stats['num_prompts']:>8}{cells}{stats['reward_mean']:>9.3f}"
            f"{stats['response_length_mean']:>8.1f}{stats['error_frac'] + stats['timeout_frac']:>8.3f}")


def results_table(results: dict[str, dict[str, Any]], ks: Sequence[int]) -> str:
    """Per checkpoint: one row per task, then per domain (mean over its prompts), then overall."""
    head = (f"{'task':<26}{'domain':<22}{'prompts':>8}" + "".join(f"{'pass@' + str(k):>10}" for k in ks) +
            f"{'reward':>9}{'length':>8}{'failed':>8}")
    lines = []
    for label, r in results.items():
        lines += ["", f"{label}: {r['num_samples_per_prompt']} samples per prompt, {r['seconds']:.1f} s "
                  f"(engine {r['engine']} in {r['engine_seconds']:.1f} s)", head]
        lines += [_row(t, s["domain"], s, ks) for t, s in sorted(r["tasks"].items())]
        per_domain = [s["domain"] for s in r["tasks"].values()]
        for d, s in r["domains"].items():
            if per_domain.count(d) > 1:  # a domain's rows only add to its tasks' rows when it has several
                lines.append(_row(f"[{d}: all prompts]", d, s, ks))
                lines.append(_row(f"[{d}: task mean]", d, {**s, "pass@k": s["pass@k_task_mean"]}, ks))
        lines.append(_row("[overall]", "", r["overall"], ks))
    lines.append("pass@k: unbiased estimator (Chen et al. 2021); 'failed': verifier errors and time outs; "
                 "'task mean': every benchmark weighs alike (reward, length, failed stay per prompt)")
    return "\n".join(lines)


def plot_pass_at_k(results: dict[str, dict[str, Any]], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["overall"] + sorted({d for r in results.values() for d in r["domains"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, r in results.items():
            stats = r["overall"] if panel == "overall" else r["domains"].get(panel)
            if stats is None:
                continue
            ks = sorted(int(k) for k in stats["pass@k"])
            ax.plot(ks, [stats["pass@k"][str(k)] for k in ks], marker="o", ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k")
        ax.set_ylim(0, 1.02)
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
