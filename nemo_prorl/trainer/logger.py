"""Metrics to JSONL (one line per step), TensorBoard, and the progress bar; reading the logs back."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from nemo_prorl.trainer.trackers import TrackerHub

ALARM_PREFIX = "alarm/reward_hacking/"  # trainer/validate.py's HackingWatch: 1.0 where a domain is flagged
# HackingWatch: 1.0 for a domain flagged at the previous validation and not at this one. The watch says it, not
# this logger's memory: a resumed run builds a new logger, while the watch's state comes from the checkpoint.
CLEARED_PREFIX = "alarm/reward_hacking_cleared/"

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
    def __init__(self, out_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool, progress_bar: bool,
                 trackers: Optional[TrackerHub] = None):
        """`trackers` (W&B, MLflow: trainer/trackers.py) get every row metrics.jsonl gets, and after each
        validation and at the end the curves PNG and the pass@k table."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.trackers = out_dir, trackers
        self.last_step, self.reported_step = start_step, start_step
        self.status = "FINISHED"  # of the trackers' runs at close
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
        self.alarms: list[str] = []  # domains the reward-hacking alarm flagged at the last validation

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        self.last_val.update({k: v for k, v in clean.items() if k.startswith("val/")})
        self.last_step = step
        if self.trackers is not None:
            self.trackers.submit("log", step, clean)
            if any(k.startswith("val/") for k in clean):
                self._report(step)
            self._tracker_events()
        if any(k.startswith((ALARM_PREFIX, CLEARED_PREFIX)) for k in clean):  # a validation: the alarm is news
            self._show_alarms(step, sorted(k[len(ALARM_PREFIX):] for k, v in clean.items()
                                           if k.startswith(ALARM_PREFIX) and v > 0),
                              sorted(k[len(CLEARED_PREFIX):] for k, v in clean.items()
                                     if k.startswith(CLEARED_PREFIX) and v > 0))

    def restore_alarms(self, domains: list[str]) -> None:
        """A resumed run: the domains its HackingWatch (restored from the checkpoint) has raised, for the bar
        until the next validation says otherwise; no event (it was logged when raised)."""
        self.alarms = sorted(domains)
        self._show_bar()

    def _show_bar(self) -> None:
        if self.bar is not None:
            self.bar.set_description(f"prorl [reward hacking? {','.join(self.alarms)}]" if self.alarms else "prorl",
                                     refresh=False)

    def _show_alarms(self, step: int, domains: list[str], cleared: list[str]) -> None:
        """Raised: an event each validation it stays raised, and the bar's title names the domains until a
        validation clears them; cleared (as HackingWatch says, also for a part of the domains): an event
        (the figures are in the trainer's warning and the metrics)."""
        if domains:
            self.event(step, "reward_hacking_alarm", domains=domains)
        if cleared:
            self.event(step, "reward_hacking_alarm_cleared", domains=cleared)
        self.alarms = domains
        self._show_bar()

    def histogram(self, step: int, name: str, values: Any) -> None:
        """A distribution (TensorBoard only; metrics.jsonl keeps its summary figures)."""
        if self.tb is not None:
            self.tb.add_histogram(name, values, step)

    def advance(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        shown = {**self.last_val, **metrics}
        self.bar.set_postfix({short: f"{shown[k]:.3g}" for k, short in BAR_KEYS.items() if k in shown}, refresh=False)
        self.bar.update(1)

    def event(self, step: int, kind: str, **info: Any) -> None:
        if kind == "preempted":  # the trackers' runs close as KILLED: the requeued job continues them
            self.status = "KILLED"
        self.events.write(json.dumps({"step": step, "event": kind, **info}) + "\n")
        if self.bar is not None:
            self.bar.write(f"[step {step}] {kind}: {info}")

    def _report(self, step: int) -> None:
        self.reported_step = step
        self.trackers.submit_report(self.out_dir, step)

    def _tracker_events(self) -> None:
        for kind, info in self.trackers.drain_events():
            self.event(self.last_step, kind, **info)

    def close(self) -> None:
        if self.trackers is not None:
            if self.last_step > self.reported_step:  # steps since the last validation: the final curves
                self._report(self.last_step)
            crashed = sys.exc_info()[0]  # closing in a `finally` while an error stops the run
            self.trackers.close("FAILED" if crashed is not None and issubclass(crashed, Exception) else
                                "KILLED" if crashed is not None else self.status)
            self._tracker_events()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()
        self.events.close()


class LogFileError(ValueError):
    """A metrics or events log that cannot be read; the message names the file and the line."""


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], Optional[str]]:
    """The rows of a JSONL log, each an object with an integer "step", and the text of a torn last line
    that was dropped (None if there was none). The last line alone may be torn: a kill or a full disk
    during its write leaves it so, and the row it held is written again when its step runs again after the
    resume. A bad line before it is damage nothing explains; LogFileError names the file and line."""
    rows, torn = _parse_jsonl(path)
    return [row for row, _ in rows], torn


def _parse_jsonl(path: Path) -> tuple[list[tuple[dict[str, Any], str]], Optional[str]]:
    numbered = [(i, line) for i, line in enumerate(path.read_text(errors="replace").split("\n"), 1) if line.strip()]
    rows = []
    for j, (i, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError('not a JSON object with an integer "step"')
        except ValueError as e:
            if j == len(numbered) - 1:
                return rows, line
            raise LogFileError(f"{path}, line {i}: {e}: {line[:200]!r}") from e
        rows.append((row, line))
    return rows, None


def truncate_logs(out_dir: Path, step: int, *, dropped_to: Optional[Path] = None) -> dict[str, Any]:
    """Drop the metric and event rows of steps after `step` (they run again after a resume), and a torn
    last line. Each file is rewritten atomically (a kill during the resume leaves the old file or the new
    one, never an empty one). The dropped rows are appended to `dropped_to/<name>` when given (a rollback
    keeps the abandoned timeline's history). Returns what was dropped, for the events log."""
    report: dict[str, Any] = {}
    for name in ("metrics.jsonl", "events.jsonl"):
        f = out_dir / name
        if not f.is_file():
            continue
        rows, torn = _parse_jsonl(f)
        kept = [line for r, line in rows if r["step"] <= step]
        dropped = [line for r, line in rows if r["step"] > step]
        if torn is not None:
            report[f"{name}_torn_line"] = torn[:200]
        if dropped:
            report[f"{name}_rows_dropped"] = len(dropped)
            if dropped_to is not None:
                with open(dropped_to / name, "a") as out:
                    out.writelines(line + "\n" for line in dropped)
        if torn is None and not dropped and _ends_with_newline(f):
            continue
        tmp = f.with_name(f".{name}.tmp-{os.getpid()}")
        with open(tmp, "w") as out:
            out.writelines(line + "\n" for line in kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, f)
    return report


def _ends_with_newline(f: Path) -> bool:
    """False for a non-empty file whose last row lacks its newline (a write cut just before it): the next
    row appended would join that line."""
    with open(f, "rb") as fh:
        if fh.seek(0, os.SEEK_END) == 0:
            return True
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
