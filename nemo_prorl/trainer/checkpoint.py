"""Atomic checkpoints, verified on load.

Everything is written into a temporary folder that is renamed into place only when complete, with a
manifest of every file's size and SHA-256 and a COMPLETE marker written last: a crash mid-write never
leaves a checkpoint that looks complete, and a truncated, missing or altered file is named when the
checkpoint is read.

Resume never runs code from a checkpoint: every state file is loaded with torch.load(weights_only=True),
so it may hold only tensors and plain data (the RNG states are stored as such). The manifest's hashes
catch damage; they are no signature (whoever can write a file can rewrite the manifest), which is why the
loads themselves must be safe.

A checkpoint holds the policy as a Hugging Face folder (model.safetensors, config.json, tokenizer), the
policy's optimizer / reference state (Megatron: every rank's shards), the trainer and data-loader state,
the RNG states, the last validation metrics, and the resolved run config."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nemo_prorl.policy.base import STATE_FILE, PolicyBackend, load_plain_state, save_plain_state, weights_only_reason

COMPLETE_MARKER = "COMPLETE"
MANIFEST = "manifest.json"
CONFIG_FILE = "prorl_config.yaml"
RNG_FILE = "rng_state.pt"
HASH_CHUNK = 1 << 20  # files are hashed in 1 MiB reads: a checkpoint's weights never sit in memory twice


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the checkpoint and the file."""


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch RNG states as plain data and a tensor, which a weights_only load reads
    back (numpy's own state is a uint32 array, which it refuses: its key is stored as a list of ints)."""
    version, internal, gauss_next = random.getstate()
    algorithm, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {"python": [int(version), [int(x) for x in internal], gauss_next],
            "numpy": [str(algorithm), key.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
            "torch": torch.get_rng_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what rng_state() returned (or a checkpoint's RNG file held), so that every later draw is the
    same as after the save."""
    state = _parse_rng_state(state)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _parse_rng_state(state: Any) -> dict[str, Any]:
    """The python, numpy and torch states in the types their setters take (and _parse_rng_state reads
    again), from rng_state()'s plain form or the tuples and uint32 array of checkpoints written before
    it. Raises ValueError on anything else: a damaged or tampered file is named, not half-applied."""
    try:
        version, internal, gauss_next = state["python"]
        algorithm, key, pos, has_gauss, cached_gaussian = state["numpy"]
        torch_state = state["torch"]
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"not an RNG state (python, numpy, torch): {e}") from e
    internal, key = list(internal), np.asarray(key)
    if version != 3 or len(internal) != 625 or not all(_is_u32(x) for x in internal) or internal[-1] > 624 \
            or not (gauss_next is None or isinstance(gauss_next, float)):
        raise ValueError("the python RNG state is not a Mersenne Twister state (version 3, 625 words)")
    if algorithm != "MT19937" or key.shape != (624,) or key.dtype.kind not in "iu" \
            or not ((key >= 0) & (key < 2**32)).all() or not _is_u32(pos) or pos > 624 \
            or has_gauss not in (0, 1) or not isinstance(cached_gaussian, float):
        raise ValueError("the numpy RNG state is not an MT19937 state (624 words)")
    if not isinstance(torch_state, torch.Tensor) or torch_state.dtype != torch.uint8 \
            or torch_state.shape != torch.get_rng_state().shape:
        raise ValueError("the torch RNG state is not a byte tensor of this torch's generator size")
    return {"python": (3, tuple(int(x) for x in internal), gauss_next),
            "numpy": ("MT19937", key.astype(np.uint32), int(pos), int(has_gauss), float(cached_gaussian)),
            "torch": torch_state}


def _is_u32(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and 0 <= x < 2**32


def file_sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `folder`: the size names a truncated file
    without reading it, the hash one whose bytes changed in place."""
    return {str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(folder.rglob("*")) if f.is_file()}


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
        save_plain_state(rng_state(), tmp / RNG_FILE)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(metrics or {}, indent=1))
        (tmp / MANIFEST).write_text(json.dumps(build_manifest(tmp), indent=1))
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
    _prune(ckpt_root, keep_last, keep_best_metric, just_written=final)
    return final


def _prune(ckpt_root: Path, keep_last: int, keep_best_metric: Optional[str],
           just_written: Optional[Path] = None) -> None:
    """Drop all but the last `keep_last` checkpoints (and the best); never the one just written, even if
    newer ones of another timeline were on disk (set_aside_newer moves those away on resume)."""
    done = list_checkpoints(ckpt_root)
    keep = set(done[-keep_last:]) | ({just_written} if just_written is not None else set())
    best = best_checkpoint(ckpt_root, keep_best_metric) if keep_best_metric else None
    if best is not None:
        keep.add(best)
    for old in done:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


ABANDONED_DIR = "abandoned"


def set_aside_newer(ckpt_root: Path, step: int) -> Optional[Path]:
    """Move the complete checkpoints after `step` into `ckpt_root/abandoned/<time>-after-step_N/` and
    return that folder (None if there were none). Resuming from an earlier checkpoint (a rollback) starts a
    new timeline: the newer checkpoints belong to the abandoned one, and left in place they would be kept by
    pruning in favour of the new ones, and picked by a later `resume=auto`. Moved, not deleted: they may be
    what the user wants back."""
    newer = [p for p in list_checkpoints(ckpt_root) if int(p.name.split("_")[1]) > step]
    if not newer:
        return None
    when = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = ckpt_root / ABANDONED_DIR / f"{when}-after-step_{step:06d}"
    n = 1
    while dest.exists():  # two rollbacks in one second
        dest, n = dest.with_name(f"{when}-{n}-after-step_{step:06d}"), n + 1
    dest.mkdir(parents=True)
    for p in newer:
        os.replace(p, dest / p.name)
    return dest


def remove_stale_temporaries(ckpt_root: Path) -> list[str]:
    """Remove the `.tmp-step_*-<pid>` folders of checkpoint writes that a kill interrupted, and return their
    names. Each is as large as a checkpoint, and the resumed run has another pid, so nothing else would
    ever remove them. Called on resume, when no earlier job of the run is still writing."""
    if not ckpt_root.is_dir():
        return []
    mine = f"-{os.getpid()}"
    stale = sorted(p for p in ckpt_root.glob(".tmp-step_*") if p.is_dir() and not p.name.endswith(mine))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


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
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"resume: {path / MANIFEST} is missing or unreadable: {e}") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"resume: checkpoint {path} is corrupt: {MANIFEST} is not a map of files")
    for name, entry in manifest.items():
        size, sha256 = _manifest_entry(path, name, entry)
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"resume: checkpoint {path} is corrupt: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"resume: checkpoint {path} is corrupt: {name} has {f.stat().st_size} bytes, "
                                  f"the manifest says {size}")
        if sha256 is not None and (got := file_sha256(f)) != sha256:
            raise CheckpointError(f"resume: checkpoint {path} is corrupt: {name}: SHA-256 mismatch (the file has "
                                  f"{got}, the manifest says {sha256}): its bytes changed after it was written")


def _manifest_entry(path: Path, name: str, entry: Any) -> tuple[int, Optional[str]]:
    """(size, sha256) of one manifest entry. Checkpoints written before the hashes recorded the size alone
    (name -> int): they are still accepted, checked by size only, since their files are loaded as safely."""
    if Path(name).is_absolute() or ".." in Path(name).parts:  # a tampered manifest must not make us read elsewhere
        raise CheckpointError(f"resume: checkpoint {path} is corrupt: {MANIFEST} names {name!r}, "
                              "outside the checkpoint")
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry, None
    if isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str) \
            and len(entry["sha256"]) == 64:
        return entry["size"], entry["sha256"].lower()
    raise CheckpointError(f"resume: checkpoint {path} is corrupt: {MANIFEST} entry of {name} is not "
                          f"{{\"size\", \"sha256\"}}: {entry!r}")


def read_checkpoint_file(path: Path, name: str) -> Any:
    """Load one state file of a verified checkpoint, never running code from it (weights_only=True); a
    file that does not parse, or pickles anything but tensors and plain data, is named. The RNG file is
    returned validated, in the form set_rng_state takes."""
    f = path / name
    try:
        if name.endswith(".json"):
            return json.loads(f.read_text())
        if name == RNG_FILE:
            return _parse_rng_state(_load_rng_file(f))
        return load_plain_state(f)
    except Exception as e:  # torch raises several types for a damaged file
        raise CheckpointError(f"resume: checkpoint {path} is corrupt: {name} cannot be read ({e})") from e


# What the RNG file of a checkpoint written before rng_state() stored plain data needs beyond weights_only's
# defaults: numpy's uint32 array (its key). Allowed for this file only, and no other dtype: an object array,
# whose elements could be anything, stays refused.
# (numpy renamed numpy.core to numpy._core in 2.0: a file pickled under either name loads under either.)
_reconstruct = np.zeros(0).__reduce__()[0]
_LEGACY_RNG_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType,
                       *((_reconstruct, f"{m}.multiarray._reconstruct") for m in ("numpy.core", "numpy._core"))]


def _load_rng_file(f: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_LEGACY_RNG_GLOBALS):
            return torch.load(f, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"it holds more than tensors and plain data, or is damaged; refused without unpickling "
                         f"it ({weights_only_reason(e)})") from e


TRAINING_STATE_FILES = {STATE_FILE, RNG_FILE, "trainer_state.json", "metrics.json", MANIFEST,
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
