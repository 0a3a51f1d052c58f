"""Atomic checkpoints: everything is written into a temporary folder that is renamed into place only when
complete, so a crash mid-write never leaves a checkpoint that looks complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nemo_prorl.policy.base import PolicyBackend

COMPLETE_MARKER = "COMPLETE"


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    policy: PolicyBackend,
    tokenizer,
    resolved_config: DictConfig,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `ckpt_root/step_{step:06d}`: HF folder (model.safetensors, config.json, tokenizer), the resolved
    run config, optimizer/reference state and trainer state. Older checkpoints beyond `keep_last` go."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp-step_{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    policy.save(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "prorl_config.yaml").write_text(OmegaConf.to_yaml(resolved_config))
    torch.save(policy.state_dict(), tmp / "policy_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    (tmp / COMPLETE_MARKER).write_text(str(step))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.glob("step_*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))
