"""Atomic checkpoints, verified on load.

Everything is written into a temporary folder that is renamed into place only when complete, with a
manifest of every file's size and a COMPLETE marker written last: a crash mid-write never leaves a
checkpoint that looks complete, and a truncated or missing file is named when the checkpoint is read.

A checkpoint holds the policy as a Hugging Face folder (model.safetensors, config.json, tokenizer), the
policy's optimizer / reference state (Megatron: every rank's shards), the trainer and data-loader state,
the RNG states, the last validation metrics, and the resolved run config."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nemo_prorl.policy.base import STATE_FILE, PolicyBackend

COMPLETE_MARKER = "COMPLETE"
MANIFEST = "manifest.json"
CONFIG_FILE = "prorl_config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the checkpoint and the file."""


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    policy: PolicyBackend,
    tokenizer,
    resolved_config: DictConfig,
    trainer_state: dict[str, Any],
    keep_last: int,
    metrics: Optional[dict[str, float]] = None,
    keep_best_metric: Optional[str] = None,
) -> Path:
    """Write `ckpt_root/step_{step:06d}` atomically, then drop checkpoints beyond the last `keep_last`
    (and the best one by `keep_best_metric`, which is kept). A failed write (disk full) removes its
    partial folder, keeps every earlier checkpoint, and raises CheckpointError."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp-step_{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        policy.save(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(resolved_config))
        policy.save_state(tmp)
        torch.save(rng_state(), tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(metrics or {}, indent=1))
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(sizes, indent=1))
        (tmp / COMPLETE_MARKER).write_text(str(step))
        _fsync_tree(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(ckpt_root)
        raise CheckpointError(f"checkpoint of step {step} could not be written to {final}: {e}; "
                              f"kept the previous one: {kept[-1] if kept else 'none'}") from e
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(ckpt_root, keep_last, keep_best_metric)
    return final


def _prune(ckpt_root: Path, keep_last: int, keep_best_metric: Optional[str]) -> None:
    done = list_checkpoints(ckpt_root)
    keep = set(done[-keep_last:])
    best = best_checkpoint(ckpt_root, keep_best_metric) if keep_best_metric else None
    if best is not None:
        keep.add(best)
    for old in done:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def best_checkpoint(ckpt_root: Path, metric: str) -> Optional[Path]:
    """The complete checkpoint with the highest `metric` among those that recorded it (latest on ties)."""
    scored = []
    for p in list_checkpoints(ckpt_root):
        try:
            value = json.loads((p / "metrics.json").read_text()).get(metric)
        except (OSError, ValueError):
            continue
        if value is not None:
            scored.append((value, int(p.name.split("_")[1]), p))
    return max(scored)[2] if scored else None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step_*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the problem if `path` is not a complete, intact checkpoint."""
    if not path.is_dir():
        raise CheckpointError(f"resume: {path} is not a checkpoint folder")
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"resume: {path} is partial (no {COMPLETE_MARKER} marker: its write was interrupted)")
    try:
        sizes = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"resume: {path / MANIFEST} is missing or unreadable: {e}") from e
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"resume: checkpoint {path} is corrupt: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"resume: checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, "
                                  f"the manifest says {size}")


def read_checkpoint_file(path: Path, name: str) -> Any:
    """Load one state file of a verified checkpoint; a file that does not parse is named."""
    f = path / name
    try:
        if name.endswith(".json"):
            return json.loads(f.read_text())
        return torch.load(f, weights_only=False)
    except Exception as e:  # torch raises several types for a damaged file
        raise CheckpointError(f"resume: checkpoint {path} is corrupt: {name} cannot be read ({e})") from e


TRAINING_STATE_FILES = {STATE_FILE, "rng_state.pt", "trainer_state.json", "metrics.json", MANIFEST,
                        COMPLETE_MARKER, CONFIG_FILE}


def export_hf(ckpt: Path, out: Path) -> Path:
    """Copy a checkpoint's Hugging Face part (safetensors, config, tokenizer) into `out`, without the
    training state, atomically. `ckpt` may be a run folder: its latest complete checkpoint is used."""
    if not (ckpt / COMPLETE_MARKER).exists() and list_checkpoints(ckpt / "checkpoints"):
        ckpt = list_checkpoints(ckpt / "checkpoints")[-1]
    verify_checkpoint(ckpt)
    if out.exists():
        raise CheckpointError(f"export: {out} exists; choose a new folder")
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(ckpt.iterdir()):  # (per-rank state lives in subfolders, which are not copied)
        if f.is_file() and f.name not in TRAINING_STATE_FILES:
            shutil.copy2(f, tmp / f.name)
    _fsync_tree(tmp)
    os.replace(tmp, out)
    return ckpt
