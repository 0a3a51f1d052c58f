"""Expert parallelism in the Megatron backend: the experts' shards (which rank holds which experts, and
their assembly into the Hugging Face model), the load-balancing losses' scale, and the per-step
load-balancing metrics. Used by the Megatron worker (policy/megatron_worker.py), the policy's export
(policy/megatron.py) and the node-local weight sync (weight_sync/sender.py). Also the MoE fields of
megatron's TransformerConfig (`moe_fields`, for policy/parallel.py's transformer_config) and the MoE shims
of megatron on CPU (`shim_moe`, shims 6-7 of policy/parallel.py's module doc).

Shards. A dense model's shard is keyed (stage, TP rank), as before. A mixture-of-experts model's weights
are split in two: the dense part of each rank (attention, norms, router, embeddings; key (stage, TP rank))
and its experts (key (stage, EXPERTS, EP rank, expert-TP rank)). Under EP the dense part is replicated over
data-parallel ranks that hold different experts, so the two are held, exported and sent separately, and
`assemble` puts them back into the arguments of megatron_to_hf_lazy.

Load-balancing losses. Megatron's router attaches the aux loss (and z-loss) to its output and adds their
gradient in backward, scaled by MoEAuxLossAutoScaler's class-wide scale. With `calculate_per_token_loss`
(ours) it multiplies each micro-batch's aux loss by the rank's token count, expecting finalize_model_grads
to divide everything by the global token count; our finalize does not divide (the ProRL loss is
normalised before backward), so the scale is set here to 1 / (tokens of the mini-batch over all DP ranks):
the update then carries coefficient x the token-weighted mean over micro-batches of each layer's aux loss
(and z-loss), whatever the layout. tests/test_megatron_moe.py checks the gradient norm of TP=2 with
sequence parallelism, EP=2 and expert-TP 1 or 2 against TP=1, EP=1 with both losses on.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

EXPERTS = -1  # the TP slot of an expert shard's key: (stage, EXPERTS, ep_rank, etp_rank)
_EXPERT_PREFIX = ".mlp.experts."


def is_expert_param(name: str) -> bool:
    return _EXPERT_PREFIX in name


def split_shard(stage: int, tp_rank: int, ep_rank: int, etp_rank: int, sd: Mapping[str, torch.Tensor],
                moe: bool) -> dict[tuple, dict[str, torch.Tensor]]:
    """One model chunk's state dict as its shards: {(stage, tp): sd} for a dense model; the dense part and
    {(stage, EXPERTS, ep, etp): experts} for an MoE one."""
    if not moe:
        return {(stage, tp_rank): dict(sd)}
    return {(stage, tp_rank): {k: v for k, v in sd.items() if not is_expert_param(k)},
            (stage, EXPERTS, ep_rank, etp_rank): {k: v for k, v in sd.items() if is_expert_param(k)}}


def assemble(items: Mapping[tuple, Mapping[str, torch.Tensor]], stages: int, tp: int, ep: int, etp: int,
             moe: bool) -> tuple[list[list[Any]], Optional[list[list[list[Any]]]]]:
    """(shards[stage][tp], experts[stage][ep][etp] or None) from keyed shards, for megatron_to_hf_lazy;
    every key must be there (a missing one raises, naming it)."""
    dense: list[list[Any]] = [[None] * tp for _ in range(stages)]
    experts: list[list[list[Any]]] = [[[None] * etp for _ in range(ep)] for _ in range(stages)]
    for key, sd in items.items():
        if len(key) == 4:
            experts[key[0]][key[2]][key[3]] = sd
        else:
            dense[key[0]][key[1]] = sd
    missing = [(s, t) for s in range(stages) for t in range(tp) if dense[s][t] is None]
    if moe:
        missing += [(s, EXPERTS, e, t) for s in range(stages) for e in range(ep) for t in range(etp)
                    if experts[s][e][t] is None]
    if missing:
        raise RuntimeError(f"weight shards {missing} are missing")
    return dense, (experts if moe else None)


# ---------------------------------------------------------------------------------------------- losses
@contextlib.contextmanager
def aux_loss_scale(scale: float, device: torch.device) -> Iterator[None]:
    """Within the block the load-balancing losses' gradient scale is `scale` (module doc), and the
    schedule's own setting of it (1 for every micro-batch) is ignored."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler as Scaler

    setter, old = Scaler.__dict__["set_loss_scale"], Scaler.main_loss_backward_scale
    Scaler.main_loss_backward_scale = torch.tensor(scale, dtype=torch.float32, device=device)
    Scaler.set_loss_scale = staticmethod(lambda s: None)
    try:
        yield
    finally:
        Scaler.set_loss_scale = setter
        Scaler.main_loss_backward_scale = old


def routers(chunks: Sequence[torch.nn.Module]) -> list[Any]:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]


class LoadMeter:
    """Counts the tokens each expert of each MoE layer is routed (forward hooks on this rank's routers),
    and reads megatron's aux-loss tracker: the step's load-balancing metrics."""

    def __init__(self, chunks: Sequence[torch.nn.Module], num_layers: int, num_experts: int) -> None:
        self.routers = routers(chunks)
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.handles: list[Any] = []

    def __enter__(self) -> "LoadMeter":
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        self.counts.zero_()
        for r in self.routers:
            self.handles.append(r.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, router: Any, args: Any, output: Any) -> None:
        # (probs, routing_map [tokens, E]); a recomputed forward counts again, which leaves the max/mean
        # ratios below as they are
        self.counts[router.layer_number - 1] += output[1].detach().sum(dim=0).to("cpu", torch.float64)

    def metrics(self, num_micro_batches: int, *, sequence_parallel: bool, device: torch.device) -> dict[str, float]:
        """Collective over all ranks. Without sequence parallelism every TP rank routes the same tokens
        (counted TP times); with it each routes its own positions: the aux loss each records is its part,
        and its z-loss the mean over its positions (so TP of them add up to TP x the mean)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        names = [n for n in ("load_balancing_loss", "seq_load_balancing_loss", "z_loss") if n in tracker]
        L = self.counts.shape[0]
        losses = torch.stack([tracker[n]["values"].detach().double().cpu() for n in names]) if names else \
            torch.zeros(0, L, dtype=torch.float64)
        flat = torch.cat([self.counts.flatten(), losses.flatten(), torch.tensor([float(num_micro_batches)],
                                                                                dtype=torch.float64)])
        # every rank adds in: layers are disjoint over PP, tokens over DP (EP ranks are DP ranks) and, with
        # sequence parallelism, over TP; the micro-batch count comes from each of the TP x PP ranks
        names_all = _same_on_all_ranks(names)
        if names_all != names:
            raise RuntimeError(f"MoE loss trackers differ across ranks: {names} vs {names_all}")
        flat = flat.to(device)
        dist.all_reduce(flat)
        flat = flat.cpu()
        counts = flat[: self.counts.numel()].view_as(self.counts)
        tp = ps.get_tensor_model_parallel_world_size()
        losses = flat[self.counts.numel(): -1].view(len(names), L)
        mbs = float(flat[-1]) / (tp * ps.get_pipeline_model_parallel_world_size())
        out: dict[str, float] = {}
        used = counts.sum(dim=1) > 0
        if used.any():
            ratio = counts[used].max(dim=1).values / counts[used].mean(dim=1)
            out.update(moe_load_imbalance=float(ratio.mean()), moe_load_imbalance_max=float(ratio.max()))
        for n, values in zip(names, losses):  # per layer: summed over micro-batches; mean over both
            key = "moe_z_loss" if n == "z_loss" else "moe_aux_loss"
            copies = tp if n == "z_loss" or not sequence_parallel else 1
            out[key] = float(values.sum() / (copies * L * max(mbs, 1.0)))
        return out


def _same_on_all_ranks(names: list[str]) -> list[str]:
    """Rank 0's list of tracker names (a cheap guard: the all-reduce below needs one layout everywhere)."""
    import torch.distributed as dist

    box = [names]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------- the model's config and CPU shims
# TransformerConfig fields that only mean something for a mixture-of-experts model: parallel.megatron_options
# sets them from policy.megatron for every model, and parallel.transformer_config drops them for a dense one
MOE_ONLY_OPTIONS = ("moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_grouped_gemm",
                    "moe_enable_routing_replay", "expert_tensor_parallel_size", "moe_router_dtype")


def moe_fields(s: Any, tp: int, pp: int, options: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of the TransformerConfig (Qwen3-MoE), or, for a dense model, `options` without the
    MoE-only ones. The router: softmax over the experts, then top-k, renormalised when norm_topk_prob, as
    transformers does. Megatron's non-pre-softmax order (top-k of the logits, then softmax over those k) is
    the same function, and pre-softmax (softmax, then top-k) is HF's norm_topk_prob=False."""
    if not s.is_moe:
        if options.get("expert_model_parallel_size", 1) != 1:
            raise ValueError(f"policy.megatron.expert_parallel_size={options['expert_model_parallel_size']}: "
                             "the model is dense (no experts to split)")
        options = {k: v for k, v in options.items() if k not in MOE_ONLY_OPTIONS}
        if pp > 1:  # a dense model has no MoE dispatcher, but the config check (variable_seq_lengths) wants this
            options["moe_token_dispatcher_type"] = "alltoall"
        else:
            options.pop("moe_token_dispatcher_type", None)
        return options
    fields = dict(num_moe_experts=s.num_experts, moe_ffn_hidden_size=s.moe_ffn_hidden_size,
                  moe_router_topk=s.moe_topk, moe_router_score_function="softmax",
                  moe_router_pre_softmax=not s.moe_norm_topk_prob, moe_token_dispatcher_type="alltoall",
                  moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0)
    fields.update(options)
    if fields["moe_token_dispatcher_type"] == "allgather" and fields.get("variable_seq_lengths"):
        raise ValueError("policy.megatron.moe_token_dispatcher_type=allgather does not take micro-batches of "
                         "varying length, which pipeline_parallel_size > 1 sends: use alltoall")
    if fields.get("moe_grouped_gemm") is None:
        fields.pop("moe_grouped_gemm", None)
    return fields


class _NoStream:
    """A stand-in for a CUDA stream or event on the CPU: every operation is already complete."""

    def wait_stream(self, *a: Any) -> None:
        pass

    def record_event(self, *a: Any) -> "_NoStream":
        return self

    def synchronize(self) -> None:
        pass


def shim_moe(cpu_torch: Any) -> None:
    """Shims 6-7 of policy/parallel.py's module doc (installed by its enable_cpu_megatron): the MoE router's
    GEMM without Transformer Engine, and the alltoall token dispatcher's device-to-host copies of its split
    sizes, which it makes on a side CUDA stream. `cpu_torch`: parallel.py's `torch` for megatron modules on
    CPU (tensors asked for on "cuda" are made on the CPU)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # 6. moe_utils binds te_general_gemm only when TE imports; the router's gating linear tests it for None
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    moe_utils.torch = cpu_torch  # the per-layer aux-loss tracker is made with device="cuda"
    # 7. the split sizes are host tensors already: the copies are the tensors themselves, made as numpy
    # arrays or lists where the dispatcher asks for them (its all-to-all takes lists of sizes)
    A2A = token_dispatcher.MoEAlltoAllTokenDispatcher
    A2A.cuda_dtoh_stream = _NoStream()

    def dtoh(self: Any, point: str, tokens_per_expert: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name, None)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
            if self.num_local_experts > 1 and not self.config.moe_permute_fusion and \
                    torch.is_tensor(getattr(self, "num_global_tokens_per_local_expert", None)):
                self.num_global_tokens_per_local_expert = self.num_global_tokens_per_local_expert.cpu()
        return tokens_per_expert

    A2A._maybe_dtoh_and_synchronize = dtoh
