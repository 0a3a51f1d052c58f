"""Rollout routing replay (R3, arXiv 2510.11370) in the Megatron backend: the experts the rollout engine
chose for every token (the batch's `routed_experts`, [B, P + R, num_moe_layers, k] integer ids) are replayed
in the logprob and training forwards with megatron-core's router replay (`moe_enable_routing_replay`,
megatron/core/transformer/moe/router_replay.py).

How megatron-core replays (0.16.1, read from its source):
  - every TopKRouter built with `moe_enable_routing_replay` owns a `RouterReplay`; its top-k is replaced
    by given indices when the action is REPLAY_FORWARD (`target_topk_idx`) or REPLAY_BACKWARD (pops the
    front of `replay_backward_list`, to which every `set_target_indices` appends). The gate values are
    still the router's own scores of those experts, so the router's weights train.
  - megatron never switches the action itself: that is done here, per model chunk and micro-batch.
  - the router sees the MoE layer's input [S, b, h] flattened to [S * b, E]: rows are sequence-major
    (row s * b + j is position s of row j). With sequence parallelism the MoE layer's input is this TP
    rank's sequence shard (the token dispatcher gathers after routing), so the rows are positions
    [r * S / TP, (r + 1) * S / TP) of TP rank r. Expert parallelism routes before dispatching, so it
    changes nothing here.
  - a router's `layer_number` is its global 1-based layer number (pipeline and virtual-pipeline offset
    included), so each chunk's routers take their own layers' routing.

The schedule (see `RoutingReplay.forward`): before a chunk's forward of a micro-batch its routers get that
micro-batch's targets and REPLAY_FORWARD; right after the forward they switch to REPLAY_BACKWARD, because
the only router calls before that chunk's next forward are recomputations in backward (full recompute).
Megatron's schedules run each chunk's backwards in the order of its forwards, which is the FIFO order of
`replay_backward_list`, also under 1F1B and interleaved pipelines with several micro-batches in flight.
A router that will not be recomputed (a forward-only run, no or selective recompute, a layer that block
recompute leaves out) gets its target taken off that list again right after the forward: nothing would
ever pop it, and the targets of every micro-batch would stay on the device until the run's end.

megatron_worker._run_schedule replays in every forward of a batch that carries routed_experts: the policy's
and the reference model's logprobs and the training step. The load-balancing aux loss (if its coefficient
is not 0) is still computed from the router's own top-k: it measures the router, not the replayed routing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch


def moe_layer_numbers(config: Any) -> list[int]:
    """The global 1-based numbers of the MoE layers of a model built from TransformerConfig `config`, in
    model order: the batch's layer index i is MoE layer moe_layer_numbers(config)[i]. Megatron's
    `moe_layer_freq`: an int f puts an MoE layer at every f-th layer from the first, a list marks each."""
    if not getattr(config, "num_moe_experts", None):
        return []
    freq = config.moe_layer_freq
    pattern = [int(i % freq == 0) for i in range(config.num_layers)] if isinstance(freq, int) else list(freq)
    if len(pattern) != config.num_layers:
        raise ValueError(f"moe_layer_freq {freq} does not cover {config.num_layers} layers")
    return [i + 1 for i, moe in enumerate(pattern) if moe]


def micro_batch_targets(routed: torch.Tensor, *, tp_rank: int = 0, tp: int = 1,
                        sequence_parallel: bool = False) -> torch.Tensor:
    """Replay targets [L, n, k] (int64) of one micro-batch for this rank's routers, from its routing
    `routed` [b, S, L, k] laid out like its tokens. Row s * b + j of layer l is position s of row j, as
    Megatron's router flattens its [S, b] input; with sequence parallelism only this TP rank's shard of
    positions (n = S / TP x b), otherwise all of them (n = S x b)."""
    if routed.dim() != 4:
        raise ValueError(f"routed experts must be [rows, positions, layers, k], got {tuple(routed.shape)}")
    x = routed.permute(1, 0, 2, 3)  # [S, b, L, k]: Megatron is sequence-first
    if sequence_parallel and tp > 1:
        S = x.shape[0]
        if S % tp:
            raise ValueError(f"a micro-batch of {S} positions does not split over {tp} sequence-parallel ranks")
        x = x[tp_rank * S // tp : (tp_rank + 1) * S // tp]
    L, k = x.shape[2:]
    # one contiguous [n, k] per layer: the router gathers its scores with it (index must be int64)
    return x.reshape(-1, L, k).permute(1, 0, 2).to(torch.long).contiguous()


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):  # DistributedDataParallel / Float16Module
        chunk = chunk.module
    return chunk


def check_replay_config(cfg: Any) -> None:
    """Refuse a TransformerConfig whose routers cannot replay, naming the setting."""
    if not moe_layer_numbers(cfg):
        raise ValueError("the batch carries routed_experts (rollout.routing_replay), but the policy has no MoE layers")
    if not cfg.moe_enable_routing_replay:
        raise RuntimeError("routing replay: the Megatron model was built without moe_enable_routing_replay "
                           "(policy/parallel.py megatron_options)")
    # both compute the top-k without asking the RouterReplay: replay would silently do nothing
    if cfg.moe_router_fusion:
        raise ValueError("rollout.routing_replay does not work with moe_router_fusion (the fused top-k has no replay)")
    if cfg.moe_router_load_balancing_type == "sinkhorn":
        raise ValueError("rollout.routing_replay does not work with "
                         "policy.megatron.moe_router_load_balancing_type=sinkhorn")
    if (getattr(cfg, "context_parallel_size", 1) or 1) > 1:
        raise ValueError("rollout.routing_replay: context parallelism is not supported (positions would be split)")


def recomputed_in_backward(cfg: Any, local_layer: int) -> bool:
    """Whether the training backward recomputes the router of this chunk's layer `local_layer` (0-based in
    the chunk), as megatron's TransformerBlock._checkpointed_forward decides: full recompute, every layer
    (uniform) or the first recompute_num_layers of each chunk (block). Selective recompute is the attention
    core only. Block recompute with FP8/FP4 skips a number of first layers known only at run time: all are
    kept then (a kept target costs memory until the run's end; a dropped one would break the backward)."""
    if cfg.recompute_granularity != "full":
        return False
    if cfg.recompute_method == "uniform" or getattr(cfg, "fp8", None) or getattr(cfg, "fp4", None):
        return True
    return local_layer < cfg.recompute_num_layers


def chunk_routers(chunk: torch.nn.Module, cfg: Any) -> list[tuple[int, Any, bool]]:
    """(batch layer index, RouterReplay, recomputed in a training backward) of every MoE router in `chunk`
    (none on a pipeline stage without MoE layers), in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    index = {n: i for i, n in enumerate(moe_layer_numbers(cfg))}
    out = []
    for local, layer in enumerate(_unwrap(chunk).decoder.layers):
        for r in layer.modules():
            if not isinstance(r, TopKRouter):
                continue
            if r.layer_number not in index or r.router_replay is None:
                raise RuntimeError(f"routing replay: the router of layer {r.layer_number} is not a replaying MoE "
                                   "layer of the model's config")
            out.append((index[r.layer_number], r.router_replay, recomputed_in_backward(cfg, local)))
    return sorted(out, key=lambda t: t[0])


class RoutingReplay:
    """Replays micro-batches' routing in the forwards of `chunks` (this rank's model chunks, as the pipeline
    schedule passes them to the forward step) in a schedule that is `forward_only` or trains. Use `forward`
    around each chunk's forward, `close` after. `routings` (each micro-batch's [b, S, L, k]) were checked
    against the model by the controller (MegatronPolicy, the same for every rank) before it sent the batch;
    they are asserted here again, before the schedule starts: a rank that raised in the middle of it, or
    alone, would leave its pipeline and expert-parallel peers waiting for it."""

    def __init__(self, chunks: Sequence[torch.nn.Module], routings: Sequence[Optional[torch.Tensor]], *,
                 forward_only: bool) -> None:
        from megatron.core import parallel_state as ps

        cfg = _unwrap(chunks[0]).config
        check_replay_config(cfg)
        self.forward_only = forward_only
        self._routers = {id(c): chunk_routers(c, cfg) for c in chunks}
        self.num_layers = len(moe_layer_numbers(cfg))
        self.top_k = cfg.moe_router_topk
        self.num_experts = cfg.num_moe_experts
        self.sequence_parallel = bool(cfg.sequence_parallel)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp = ps.get_tensor_model_parallel_world_size()
        for routed in routings:
            self.check(routed)

    def check(self, routed: Optional[torch.Tensor]) -> None:
        """Assert that a micro-batch routing [b, S, L, k] fits this model. The controller's
        check_routed_experts (the same on every rank) and the micro-batching (widths a multiple of the TP
        size with sequence parallelism) make these unreachable: failing one is a bug, not a bad batch."""
        assert routed is not None, "routing replay: a micro-batch without routed_experts"
        assert routed.dim() == 4 and tuple(routed.shape[2:]) == (self.num_layers, self.top_k), \
            f"routed_experts of shape {tuple(routed.shape)}: not [rows, positions, {self.num_layers}, {self.top_k}]"
        assert not routed.numel() or (int(routed.min()) >= 0 and int(routed.max()) < self.num_experts), \
            f"routed_experts name an expert outside [0, {self.num_experts})"
        assert not (self.sequence_parallel and self.tp > 1 and routed.shape[1] % self.tp), \
            f"a micro-batch of {routed.shape[1]} positions does not split over {self.tp} sequence-parallel ranks"

    @contextlib.contextmanager
    def forward(self, chunk: torch.nn.Module, routed: torch.Tensor) -> Iterator[None]:
        """Around `chunk`'s forward of one micro-batch whose routing is `routed` [b, S, L, k]."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        routers = self._routers.get(id(chunk))
        if routers is None:
            raise RuntimeError("routing replay: forward of a model chunk it was not set up for")
        if not routers:  # a pipeline stage without MoE layers
            yield
            return
        targets = micro_batch_targets(routed, tp_rank=self.tp_rank, tp=self.tp,
                                      sequence_parallel=self.sequence_parallel)
        device = next(_unwrap(chunk).parameters()).device
        for layer, rr, _ in routers:
            # appended to its replay_backward_list too, for a recomputation in backward
            rr.set_target_indices(targets[layer].to(device))
            rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        try:
            yield
        finally:
            for _, rr, recomputed in routers:
                rr.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
                if self.forward_only or not recomputed:
                    rr.replay_backward_list.pop()  # this forward's target: no backward will ask for it

    def close(self) -> None:
        """Routers back to routing themselves, their targets dropped (the backward lists of forward-only
        runs, or of layers that are not recomputed, are never popped)."""
        for routers in self._routers.values():
            for _, rr, _ in routers:
                rr.clear_indices()
                rr.clear_router_replay_action()


@contextlib.contextmanager
def routing_replay(chunks: Sequence[torch.nn.Module], routings: Sequence[Optional[torch.Tensor]], *,
                   forward_only: bool) -> Iterator[Optional[RoutingReplay]]:
    """A RoutingReplay for `chunks` and the micro-batches' `routings` while inside, its routers reset on
    exit, also after an error; None where no micro-batch carries routing (no replay)."""
    if all(r is None for r in routings):
        yield None
        return
    replay = RoutingReplay(chunks, routings, forward_only=forward_only)
    try:
        yield replay
    finally:
        replay.close()
