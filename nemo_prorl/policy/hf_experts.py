"""Mixture-of-experts weights: the per-expert names Hugging Face checkpoints use <-> transformers' fused
in-memory layout (pure tensor views; no distributed or model imports, so the rollout engines can use it).

On disk (what `save_pretrained` writes and vLLM loads), and everywhere in this project that names weights
(the weight sync, `prorl convert`, the Megatron mapping), each expert is three matrices:
    model.layers.L.mlp.experts.E.gate_proj.weight [I, H], .up_proj.weight [I, H], .down_proj.weight [H, I]
transformers 5 (5.19 and 5.25 alike) fuses them in memory into two parameters per layer:
    model.layers.L.mlp.experts.gate_up_proj [E, 2I, H]   expert E's gate rows, then its up rows
    model.layers.L.mlp.experts.down_proj    [E, H, I]
(its checkpoint conversion "qwen2_moe": MergeModulelist(dim=0) then Concatenate(dim=1) of [gate, up]; the
forward takes `linear(x, gate_up_proj[e]).chunk(2, dim=-1)` as gate, up). The model's `state_dict()` has
the fused names, so the policy names its weights through `canonical_items` and the torch engine writes
canonical names into the fused parameters through `resolve`.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping, Optional

import torch

GATE_UP, DOWN = "gate_up_proj", "down_proj"
_FUSED = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<kind>gate_up_proj|down_proj)$")
_CANONICAL = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<expert>\d+)\.(?P<kind>gate|up|down)_proj\.weight$")


def is_fused(name: str) -> bool:
    return _FUSED.match(name) is not None


def expert_views(fused_name: str, fused: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The per-expert (canonical) weights of one fused parameter, as views of it, in expert order."""
    m = _FUSED.match(fused_name)
    if m is None:
        raise ValueError(f"{fused_name}: not a fused experts parameter")
    prefix = m["prefix"]
    if m["kind"] == GATE_UP:
        half = fused.shape[1] // 2
        for e in range(fused.shape[0]):
            yield f"{prefix}{e}.gate_proj.weight", fused[e, :half]
            yield f"{prefix}{e}.up_proj.weight", fused[e, half:]
    else:
        for e in range(fused.shape[0]):
            yield f"{prefix}{e}.down_proj.weight", fused[e]


def canonical_items(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs with every fused experts parameter replaced by its per-expert views; the rest
    (dense models: everything) passes through unchanged. Within a layer the experts come expert by expert
    (gate, up of all experts, then down of all experts: the order of the fused parameters)."""
    for name, tensor in items:
        if is_fused(name):
            yield from expert_views(name, tensor)
        else:
            yield name, tensor


def canonical_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict with per-expert names (views of the fused tensors, no copies)."""
    return dict(canonical_items(sd.items()))


def fused_slot(name: str) -> Optional[tuple[str, int, str]]:
    """For a canonical expert weight name, (fused parameter name, expert index, "gate" | "up" | "down");
    None for any other name."""
    m = _CANONICAL.match(name)
    if m is None:
        return None
    kind = m["kind"]
    return m["prefix"] + (DOWN if kind == "down" else GATE_UP), int(m["expert"]), kind


def slot_view(fused: torch.Tensor, expert: int, kind: str) -> torch.Tensor:
    """The view of `fused` that holds one expert's gate, up or down matrix."""
    if kind == "down":
        return fused[expert]
    half = fused.shape[1] // 2
    return fused[expert, :half] if kind == "gate" else fused[expert, half:]


def resolve(params: Mapping[str, torch.Tensor], name: str) -> Optional[torch.Tensor]:
    """The tensor (or view of a fused experts parameter) that weight `name` lives in; None if neither."""
    target = params.get(name)
    if target is not None:
        return target
    slot = fused_slot(name)
    if slot is None or slot[0] not in params or slot[1] >= params[slot[0]].shape[0]:
        return None
    fused = params[slot[0]]
    return slot_view(fused.data if isinstance(fused, torch.nn.Parameter) else fused, slot[1], slot[2])


def fuse_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert names -> transformers' fused layout (new tensors for the experts; the rest as given):
    what `load_state_dict` of a transformers MoE model takes."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in sd.items():
        slot = fused_slot(name)
        if slot is None:
            out[name] = t
        else:
            experts.setdefault(slot[0].rsplit(".", 1)[0], {}).setdefault(slot[1], {})[slot[2]] = t
    for prefix, by_expert in experts.items():
        order = sorted(by_expert)
        if order != list(range(len(order))):
            raise ValueError(f"{prefix}: experts {order} are not 0..{len(order) - 1}")
        out[f"{prefix}.{GATE_UP}"] = torch.stack([torch.cat([by_expert[e]["gate"], by_expert[e]["up"]]) for e in order])
        out[f"{prefix}.{DOWN}"] = torch.stack([by_expert[e]["down"] for e in order])
    return out
