"""Checks shared by the end-to-end tests: that a run really trained (an update every step, weights that
moved) and that two checkpoints hold the same weights and optimizer state, bit for bit."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file


def assert_every_step_updated(rows: Iterable[dict[str, Any]]) -> None:
    """Each training row of metrics.jsonl took an optimizer step with a non-zero gradient."""
    train = [r for r in rows if "actor/update_skipped" in r]
    assert train, "no training step was logged"
    for r in train:
        assert r["actor/update_skipped"] == 0.0 and r.get("actor/grad_norm", 0.0) > 0.0, (
            f"step {r['step']} took no update: kept_groups={r.get('filter/kept_groups')}, "
            f"grad_norm={r.get('actor/grad_norm')}, update_skipped={r['actor/update_skipped']}")


def assert_weights_moved(ckpt: Path, model_dir: Path) -> None:
    saved, start = load_file(ckpt / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert set(saved) == set(start)
    assert any(not torch.equal(saved[k], start[k]) for k in saved), f"{ckpt}: weights equal the initial model's"


def policy_state(ckpt: Path, policy: Any = None) -> dict[str, Any]:
    """The optimizer (and reference) state of a checkpoint as flat {key: tensor or value}: the hf backend's
    policy_state.pt, or for a Megatron distributed checkpoint what `policy` (a Megatron backend of the same
    layout) holds after loading it. (The checkpoint's own bucket tensors keep megatron's uninitialised
    padding, which differs from run to run.)"""
    if (ckpt / "megatron").is_dir():
        assert policy is not None, f"{ckpt} is a Megatron checkpoint: pass a Megatron policy to load it into"
        policy.load_state(ckpt)
        return _flat(policy.state_dict())
    return _flat(torch.load(ckpt / "policy_state.pt", weights_only=True))


def _flat(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    if isinstance(x, (list, tuple)):
        return {k: v for i, val in enumerate(x) for k, v in _flat(val, f"{prefix}{i}.").items()}
    if isinstance(x, io.BytesIO):
        return {prefix: x.getvalue()}
    return {prefix: x}


def assert_same_state(a: Path, b: Path, policy: Any = None) -> None:
    """Checkpoints `a` and `b` hold bit-identical weights and optimizer state (Adam's moments and step
    counts; for Megatron also its main parameters), loaded into `policy` where they are Megatron's."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(wa) == set(wb)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == [], "weights differ"
    sa, sb = policy_state(a, policy), policy_state(b, policy)
    assert set(sa) == set(sb), set(sa) ^ set(sb)
    tensors = [k for k, v in sa.items() if isinstance(v, torch.Tensor)]
    assert any("exp_avg" in k for k in tensors), f"no Adam moments in {a}: {sorted(sa)[:20]}"
    steps = {float(sa[k]) for k in tensors if k.endswith(".step.")}
    assert steps and min(steps) > 0, f"Adam step counts {steps}: the optimizer state is of no update"
    differ = [k for k, v in sa.items()
              if not (torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k])]
    assert differ == [], f"optimizer state differs: {differ[:10]}"


def assert_update_matches(metrics: dict, reference: dict, weights: dict, ref_weights: dict) -> None:
    """A Megatron update equals the transformers backend's on the same batch: loss, gradient norm and the
    updated weights (float32 on CPU, summed in another order: 1e-6, 1e-5 relative, 2e-6)."""
    import pytest

    assert metrics["loss"] == pytest.approx(reference["loss"], abs=1e-6)
    assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert set(weights) == set(ref_weights)
    assert max((ref_weights[k] - weights[k]).abs().max().item() for k in ref_weights) < 2e-6
