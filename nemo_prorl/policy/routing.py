"""Rollout routing replay (R3, arXiv 2510.11370) for transformers mixture-of-experts models: forward hooks
on the routers that record the experts each MoE layer picks, or force given ones.

A forced router still computes its softmax over all experts with its own weights; the gate values of the
forced experts are taken from that softmax (renormalised over the k of them when the model normalises its
top-k probabilities), exactly as the router computes them for the experts it picks itself. So forcing the
experts the router would have picked changes nothing, bit for bit, and the router's weights get gradient
through the gate values, as with Megatron's router replay (moe_enable_routing_replay).

Layouts follow the contract of rollout/base.py's `Completion.routed_experts` and the batch's
`routed_experts`: [..., num_moe_layers, top_k], MoE layers in model order. A router sees its input
flattened to [batch x sequence, hidden], so a forward's routing is [batch, sequence, layers, k] in the
row-major order of its input ids."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator, Optional

import torch

# Routers whose forward is: softmax over all experts (float32), top-k, optional renormalisation
# (norm_topk_prob), cast to the logits' dtype; output (router_logits, top-k weights, top-k indices).
# Forcing re-does that computation for given indices, so a router family is listed here only once its
# forward has been read to be exactly this (transformers 5.x); others are refused rather than replayed wrong.
SOFTMAX_TOPK_ROUTERS = ("Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter")


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The top-k routers of `model`'s MoE layers, in model order (empty for a dense model). Raises
    ValueError for a router family whose gate computation forcing would not reproduce."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    odd = sorted({type(m).__name__ for m in routers} - set(SOFTMAX_TOPK_ROUTERS))
    if odd:
        raise ValueError(f"rollout.routing_replay: router {', '.join(odd)} is not supported (supported: "
                         f"{', '.join(SOFTMAX_TOPK_ROUTERS)})")
    return routers


def forced_gates(router_logits: torch.Tensor, indices: torch.Tensor, norm_topk_prob: bool) -> torch.Tensor:
    """The gate values of experts `indices` [N, k] from the router's logits [N, E], as the router computes
    them for its own top-k (same operations in the same order, so equal choices give equal bits)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    gates = probs.gather(-1, indices)
    if norm_topk_prob:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return gates.to(router_logits.dtype)


class MoERouting:
    """Hooks on every router of `model`. Outside `recording()` and `forcing()` they do nothing. State is
    per thread, so a thread's forward never sees another's forced routing."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = moe_routers(model)
        self.top_k = int(self.routers[0].top_k) if self.routers else 0
        self._local = threading.local()
        self._handles = [r.register_forward_hook(functools.partial(self._hook, i))
                         for i, r in enumerate(self.routers)]

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ per-thread state
    def _state(self) -> dict:
        if not hasattr(self._local, "state"):
            self._local.state = {"recorded": None, "active": False, "forced": None}
        return self._local.state

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record each router's top-k indices in the forwards inside; `take` returns them."""
        st = self._state()
        st["recorded"], st["active"] = [[] for _ in self.routers], True
        try:
            yield
        finally:
            st["active"] = False  # what was recorded stays for `take`

    def take(self, rows: int) -> torch.Tensor:
        """The routing recorded since `recording()` began, as int16 [rows, tokens, layers, k] (the last
        forward's, where several ran), and clears it."""
        st = self._state()
        recorded = st["recorded"]
        if recorded is None or any(not r for r in recorded):
            raise RuntimeError("routing replay: no forward was recorded")
        per_layer = [r[-1] for r in recorded]
        st["recorded"] = None
        n = per_layer[0].shape[0]
        if n % rows:
            raise RuntimeError(f"routing replay: {n} routed tokens do not split into {rows} rows")
        return torch.stack(per_layer, dim=1).view(rows, n // rows, len(per_layer), self.top_k)

    @contextlib.contextmanager
    def forcing(self, experts: torch.Tensor) -> Iterator[None]:
        """Make the forwards inside use `experts`, [batch, sequence, layers, k] aligned with their input
        ids (any integer dtype, on any device)."""
        if experts.dim() != 4 or experts.shape[2:] != (self.num_layers, self.top_k):
            raise ValueError(f"routing replay: routed experts of shape {tuple(experts.shape)} do not fit this "
                             f"model ([batch, sequence, {self.num_layers} MoE layers, top-{self.top_k}])")
        num_experts = int(self.routers[0].num_experts)
        if experts.numel() and (int(experts.min()) < 0 or int(experts.max()) >= num_experts):
            raise ValueError(f"routing replay: an expert index outside [0, {num_experts})")
        st = self._state()
        previous = st["forced"]
        st["forced"] = experts.reshape(-1, self.num_layers, self.top_k)
        try:
            yield
        finally:
            st["forced"] = previous

    # ------------------------------------------------------------------ the hook
    def _hook(self, layer: int, router: torch.nn.Module, args: tuple, output: tuple) -> Optional[tuple]:
        st = getattr(self._local, "state", None)
        if st is None:
            return None
        forced: Optional[torch.Tensor] = st["forced"]
        if forced is not None:
            logits = output[0]
            if forced.shape[0] != logits.shape[0]:
                raise RuntimeError(f"routing replay: {forced.shape[0]} forced routings for {logits.shape[0]} "
                                   f"tokens in MoE layer {layer}")
            idx = forced[:, layer].to(device=logits.device, dtype=torch.long)
            output = (logits, forced_gates(logits, idx, bool(router.norm_topk_prob)), idx) + tuple(output[3:])
        if st["active"]:
            st["recorded"][layer].append(output[2].detach().to(torch.int16))
        return output if forced is not None else None
