"""A checkpoint is data: resume never runs code from it, and names any file whose bytes changed.

The attacks replace a state file by a pickle whose __reduce__ writes a marker file, and update the manifest
to match as an attacker who can write the checkpoint folder would: resume must refuse the file by name,
and the marker must never appear."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nemo_prorl.config.loader import load_config
from nemo_prorl.train import run_training
from nemo_prorl.trainer.checkpoint import (CheckpointError, list_checkpoints, read_checkpoint_file, rng_state,
                                           set_rng_state, verify_checkpoint)
from tests.conftest import TINY_OVERRIDES


def _args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.num_steps=2",
            "trainer.checkpoint_every_n_steps=1", "trainer.plot=false", "trainer.tensorboard=false",
            "validation.every_n_steps=0", *extra]


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real checkpoint (hf policy, one training step), made once: each test tampers with a copy."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    cfg, resolved = load_config(_args(tiny_model_dir, out, "trainer.num_steps=1"))
    run_training(cfg, resolved)
    return list_checkpoints(out / "checkpoints")[-1]


@pytest.fixture()
def checkpoint(trained_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoints" / trained_checkpoint.name
    shutil.copytree(trained_checkpoint, copy)
    return copy


def _resume(model_dir: Path, tmp_path: Path, ckpt: Path) -> None:
    cfg, resolved = load_config(_args(model_dir, tmp_path / "again", f"resume={ckpt}"))
    run_training(cfg, resolved)


class _WritesMarker:
    """What an attacker plants: unpickling it runs exec, which here only writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code from the checkpoint ran')",)


def _reseal(ckpt: Path, name: str) -> None:
    """Update the manifest entry of `name` to match its new bytes, in the entry's own format: a size alone
    in checkpoints written before the hashes (so that the attack also reaches the load on older code)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest[name] = len(data) if isinstance(manifest[name], int) else {
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _sizes_only(ckpt: Path) -> None:
    """Rewrite the manifest as checkpoints wrote it before the hashes: name -> size."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    sizes = {name: (ckpt / name).stat().st_size for name in manifest}
    (ckpt / "manifest.json").write_text(json.dumps(sizes, indent=1))


@pytest.mark.parametrize("manifest", ["sha256", "sizes-only"])
@pytest.mark.parametrize("name", ["rng_state.pt", "policy_state.pt"])
def test_a_malicious_pickle_in_a_state_file_is_refused_and_never_run(tiny_model_dir, tmp_path, checkpoint, name,
                                                                     manifest):
    marker = tmp_path / "PWNED"
    torch.save({"python": _WritesMarker(marker), "optimizer": _WritesMarker(marker)}, checkpoint / name)
    if manifest == "sizes-only":
        _sizes_only(checkpoint)
    _reseal(checkpoint, name)
    verify_checkpoint(checkpoint)  # the manifest matches: only the load itself can stop the attack
    with pytest.raises(CheckpointError) as e:
        _resume(tiny_model_dir, tmp_path, checkpoint)
    assert not marker.exists(), "resume ran code from the checkpoint"
    msg = str(e.value)
    assert str(checkpoint) in msg and name in msg and "refused without unpickling" in msg, msg
    assert "weights_only=False" not in msg, msg  # never advise the unsafe load as the way out


@pytest.mark.parametrize("name", ["rng_state.pt", "model.safetensors"])
def test_bytes_changed_in_place_are_named_by_sha256(tiny_model_dir, tmp_path, checkpoint, name):
    f = checkpoint / name
    data = bytearray(f.read_bytes())
    data[-len(data) // 3] ^= 0x01  # one bit, same size: a size check alone passes it
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{checkpoint} is corrupt: {name}: SHA-256 mismatch"):
        verify_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=rf"corrupt: {name}: SHA-256 mismatch"):
        _resume(tiny_model_dir, tmp_path, checkpoint)


def test_the_manifest_records_size_and_sha256_and_old_sizes_only_manifests_are_accepted(checkpoint):
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert {"policy_state.pt", "rng_state.pt", "model.safetensors", "trainer_state.json"} <= set(manifest)
    for name, entry in manifest.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    _sizes_only(checkpoint)
    verify_checkpoint(checkpoint)
    (checkpoint / "metrics.json").write_text("{}" + " " * ((checkpoint / "metrics.json").stat().st_size - 2))
    verify_checkpoint(checkpoint)  # sizes only: a same-size change cannot be seen, but nothing is unpickled
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    (checkpoint / "manifest.json").write_text(json.dumps({**manifest, "../outside": 1}))
    with pytest.raises(CheckpointError, match=r"manifest.json names '../outside', outside the checkpoint"):
        verify_checkpoint(checkpoint)


def test_checkpoint_state_files_hold_only_tensors_and_plain_data(checkpoint):
    for name in ("rng_state.pt", "policy_state.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint / name) == [], name
        torch.load(checkpoint / name, weights_only=True)  # what resume does, with torch's own allowlist


def _draws() -> list[Any]:
    return [random.random(), random.gauss(0.0, 1.0), random.getrandbits(64), np.random.rand(5).tolist(),
            float(np.random.standard_normal()), np.random.randint(0, 2**31, 4).tolist(), torch.rand(5).tolist(),
            torch.randn(3).tolist(), torch.randint(0, 2**31, (4,)).tolist()]


def _scramble() -> None:
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


@pytest.mark.parametrize("layout", ["plain", "legacy"])
def test_rng_state_roundtrip_restores_every_generator_exactly(tmp_path, layout):
    """python, numpy and torch continue with the same draws after a save and a restore, including the
    cached second normal of random.gauss and numpy's standard_normal; a legacy file (the tuples and numpy
    array written before) still loads with weights_only."""
    random.seed(7)
    np.random.seed(8)
    torch.manual_seed(9)
    _draws()  # leaves a cached gaussian in python's and numpy's state
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    if layout == "plain":
        from nemo_prorl.policy.base import save_plain_state

        save_plain_state(rng_state(), tmp_path / "rng_state.pt")  # as save_checkpoint writes it
    else:
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                   tmp_path / "rng_state.pt")
    after_save = _draws()
    _scramble()
    assert _draws() != after_save
    set_rng_state(read_checkpoint_file(tmp_path, "rng_state.pt"))
    assert _draws() == after_save
    _scramble()
    set_rng_state(read_checkpoint_file(tmp_path, "rng_state.pt"))
    assert _draws() == after_save  # the file is read, not consumed: a second resume continues the same way


def test_a_legacy_rng_file_may_hold_a_uint32_array_but_no_object_array(tmp_path):
    marker = tmp_path / "PWNED"
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": ("MT19937", np.array([_WritesMarker(marker)] * 624, dtype=object), 0, 0, 0.0)}
    torch.save(state, tmp_path / "rng_state.pt")
    with pytest.raises(CheckpointError, match=r"corrupt: rng_state.pt cannot be read .*refused without unpickling"):
        read_checkpoint_file(tmp_path, "rng_state.pt")
    assert not marker.exists()
    torch.save({**state, "numpy": ("MT19937", np.arange(624, dtype=np.uint32), 0, 0, 0.0), "torch": "x"},
               tmp_path / "rng_state.pt")
    with pytest.raises(CheckpointError, match=r"rng_state.pt cannot be read .*torch RNG state is not a byte tensor"):
        read_checkpoint_file(tmp_path, "rng_state.pt")
