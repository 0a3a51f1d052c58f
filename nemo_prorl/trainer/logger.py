"""Metrics to JSONL (one line per step), TensorBoard, and the progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

# What the progress bar shows, under short names: reward, entropy, KL, length, clip and filtered fractions.
BAR_KEYS = {
    "reward/mean": "reward",
    "actor/entropy": "ent",
    "actor/kl": "kl",
    "response_length/mean": "len",
    "actor/clip_frac": "clip",
    "filter/filtered_group_frac": "filt",
    "val/pass@1": "val@1",
}


class MetricsLogger:
    def __init__(self, out_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool, progress_bar: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        self.events = open(out_dir / "events.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        self.bar: Optional[tqdm] = None
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="prorl", unit="step", dynamic_ncols=True)
        self.last_val: dict[str, float] = {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        self.last_val.update({k: v for k, v in clean.items() if k.startswith("val/")})

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        shown = {**self.last_val, **metrics}
        self.bar.set_postfix({short: f"{shown[k]:.3g}" for k, short in BAR_KEYS.items() if k in shown}, refresh=False)
        self.bar.update(1)

    def event(self, step: int, kind: str, **info: Any) -> None:
        self.events.write(json.dumps({"step": step, "event": kind, **info}) + "\n")
        if self.bar is not None:
            self.bar.write(f"[step {step}] {kind}: {info}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()
        self.events.close()
