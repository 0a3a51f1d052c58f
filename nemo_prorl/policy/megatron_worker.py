"""One rank of the Megatron-core policy: its model chunks, frozen reference, DDP and optimizer, driven by
commands from `MegatronPolicy` (policy/megatron.py) and from the weight sync (weight_sync/sync.py) over a
queue. Each command runs on every rank of the group at once (all of them take part in the collectives);
the last pipeline stage computes the log-probabilities and the loss with vocab-parallel cross entropy.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch

from nemo_prorl.cluster.actors import ActorBase
from nemo_prorl.config.schema import MegatronConfig, OptimConfig
from nemo_prorl.policy.base import Batch, LossFn
from nemo_prorl.policy.megatron_convert import ModelShape, from_te_names, hf_to_megatron, lazy_hf_weights, to_te_names
from nemo_prorl.policy.microbatch import (MicroBatch, empty_micro_batch, make_micro_batch, pad_micro_batch,
                                          response_values, split_micro_batches)
from nemo_prorl.procs import ignore_preemption_signals
from nemo_prorl.torch_utils import DTYPES


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    world_size: int
    model_dir: str
    megatron: MegatronConfig
    optim: OptimConfig
    dtype: str
    seed: int
    use_reference: bool
    num_threads: int
    entropy_grad: bool = False  # algo.entropy_coef > 0: the entropy bonus needs its gradient


def _quiet_optional_dependency_warnings() -> None:
    # megatron-core says on import, per module, that apex/TE are absent and it uses the torch paths.
    for msg in (".*Apex is not installed.*", ".*Transformer Engine and Apex are not installed.*",
                ".*CUDA_DEVICE_MAX_CONNECTIONS.*", ".*is not a leaf Tensor is being accessed.*",
                ".*full scope is deprecated.*", ".*torch.distributed.* is deprecated.*"):
        warnings.filterwarnings("ignore", message=msg)


# Transformer Engine's FP8 GEMMs need the token dimension (rows x width) divisible by 16.
FP8_TOKEN_MULTIPLE = 16


def sequence_pad_multiple(m: MegatronConfig) -> int:
    """What a micro-batch's width is rounded up to: the TP size with sequence parallelism (the sequence is
    split over the TP ranks), and a multiple of 16 with FP8."""
    base = m.tensor_parallel_size if m.sequence_parallel else 1
    return math.lcm(base, FP8_TOKEN_MULTIPLE) if m.fp8 else base


class MegatronWorker:
    def __init__(self, spec: WorkerSpec, rendezvous: Any) -> None:
        from megatron.core import parallel_state as ps
        from transformers import AutoConfig

        from nemo_prorl.policy import parallel

        m = self.m = spec.megatron
        self.spec = spec
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.device = parallel.init_distributed(spec.rank, spec.world_size, rendezvous=rendezvous,
                                                backend=m.dist_backend)
        parallel.init_model_parallel(m.tensor_parallel_size, m.pipeline_parallel_size, spec.seed,
                                     vp=m.virtual_pipeline_parallel_size, ep=m.expert_parallel_size,
                                     etp=m.expert_tensor_parallel_size)
        self.hf_config = AutoConfig.from_pretrained(spec.model_dir)
        self.shape = ModelShape.from_hf_config(self.hf_config)
        self.tp_rank, self.pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        # this rank's experts: EP rank (which experts), expert-TP rank (which slice of each), and its place
        # among the ranks that hold the same experts (expert-DP; rank 0 of it exports them)
        self.ep, self.etp = m.expert_parallel_size, m.expert_tensor_parallel_size or m.tensor_parallel_size
        self.ep_rank, self.etp_rank = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
        self.edp_rank = ps.get_expert_data_parallel_rank()
        self.is_last = ps.is_pipeline_last_stage()
        self.te = parallel.use_transformer_engine(m.transformer_impl)
        # Transformer Engine's layer spec names the norms it fuses into the next linear (and the grouped-GEMM
        # experts) differently from the local spec our conversion speaks: shards are renamed at this border
        self.grouped_experts = self.te and self.shape.is_moe and m.moe_grouped_gemm is not False
        self.pad_multiple = sequence_pad_multiple(m)
        hf = lazy_hf_weights(spec.model_dir)
        chunks = self._build_chunks(hf)
        o = spec.optim
        self.model, self.optimizer = parallel.wrap_for_training(
            chunks, use_distributed_optimizer=m.use_distributed_optimizer, lr=o.lr, weight_decay=o.weight_decay,
            betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip)
        self.reference = None
        if spec.use_reference:
            self.reference = self._build_chunks(hf)
            for c in self.reference:
                c.eval().requires_grad_(False)

    # ------------------------------------------------------------------ building and weights
    def _build_chunks(self, hf: Any) -> list[torch.nn.Module]:
        """This rank's model chunks: one, or with an interleaved pipeline, chunk i holding the layers of
        virtual stage i * PP + pipeline rank (of PP x VP stages)."""
        from nemo_prorl.policy.parallel import build_gpt, megatron_options

        m = self.m
        vp = m.virtual_pipeline_parallel_size
        chunks = []
        for i in range(vp or 1):
            chunk = build_gpt(self.hf_config, tp=m.tensor_parallel_size, pp=m.pipeline_parallel_size,
                              vocab_multiple=m.make_vocab_size_divisible_by, dtype=DTYPES[self.spec.dtype], te=self.te,
                              vp_stage=i if vp else None, **megatron_options(m))
            chunk.to(self.device)
            shard = hf_to_megatron(hf, self.shape, tp_rank=self.tp_rank, tp=m.tensor_parallel_size,
                                   pp_rank=i * m.pipeline_parallel_size + self.pp_rank,
                                   pp=m.pipeline_parallel_size * (vp or 1), vocab_multiple=m.make_vocab_size_divisible_by,
                                   ep_rank=self.ep_rank, ep=self.ep, etp_rank=self.etp_rank, etp=self.etp)
            self._load_shard(chunk, to_te_names(shard, grouped_experts=self.grouped_experts) if self.te else shard)
            chunks.append(chunk)
        return chunks

    @staticmethod
    def _load_shard(chunk: torch.nn.Module, shard: dict[str, torch.Tensor]) -> None:
        missing, unexpected = chunk.load_state_dict(shard, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"Megatron shard does not fit the model: missing {missing}, unexpected {unexpected}")

    @staticmethod
    def _module(chunk: torch.nn.Module) -> torch.nn.Module:
        return getattr(chunk, "module", chunk)

    def _chunk_state(self, chunks: list[torch.nn.Module]) -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach().cpu().clone() for k, v in self._module(c).state_dict().items()
                 if not k.endswith("_extra_state")} for c in chunks]

    # ------------------------------------------------------------------ the pipeline schedule
    def _run_schedule(self, chunks: list[torch.nn.Module], mbs: list[MicroBatch],
                      loss_for: Callable[[MicroBatch, torch.Tensor], Any], *, forward_only: bool) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_prorl.policy.megatron_replay import routing_replay

        replay = None  # routing replay (rollout.routing_replay): set below when the batch carries routing

        def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
            mb = next(data_iterator)
            tokens = mb.tokens.to(self.device)
            S = tokens.shape[1]
            pos = torch.arange(S, device=self.device).unsqueeze(0).expand_as(tokens)
            # right-padded rows: the causal mask is all the masking needed (True = masked out); TE's
            # attention applies it itself (causal mask type) on its fused path
            causal = None if self.te else torch.ones(S, S, dtype=torch.bool, device=self.device).triu(1).view(1, 1, S, S)
            with replay.forward(model, mb.routed_experts) if replay else contextlib.nullcontext():
                out = model(tokens, pos, attention_mask=causal)
            return out, partial(loss_for, mb)

        data = [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)
        with routing_replay(chunks, [mb.routed_experts for mb in mbs], forward_only=forward_only) as replay:
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(mbs), seq_length=max(mb.tokens.shape[1] for mb in mbs),
                micro_batch_size=max(mb.tokens.shape[0] for mb in mbs), forward_only=forward_only)

    def _split(self, batch: Batch, max_tokens: int) -> list[MicroBatch]:
        pad = dict(pad_token_id=0, pad_multiple=self.pad_multiple, num_experts=self.shape.num_experts or None)
        mbs = split_micro_batches(batch, max_tokens, **pad)
        # A mini-batch with fewer rows than DP ranks leaves some ranks none. They must still run the step's
        # collectives (pipeline p2p, the DP gradient reduction, TP all-reduces), so they run an empty, fully
        # masked micro-batch: the loss normalisers are the mini-batch totals, so it adds exactly nothing.
        # An MoE layer's token dispatch is a collective of its expert group, which under EP spans DP ranks
        # (EP x expert-TP > TP): every rank of it must run as many micro-batches as the others, or the one
        # with more waits forever. Ranks pack their own rows, so their counts differ: all DP ranks of an MoE
        # model run the largest count, the rest in empty micro-batches (also under EP=1, so that the
        # load-balancing loss, whose router sees the empty ones' padding tokens, is the same on any layout).
        mbs += [empty_micro_batch(batch, **pad) for _ in range(self._dp_max(len(mbs)) - len(mbs))]
        need = self.m.pipeline_parallel_size if self.m.virtual_pipeline_parallel_size else 1
        if self.m.virtual_pipeline_parallel_size:
            # the interleaved schedule wants at least PP micro-batches: split the largest until there are
            while 0 < len(mbs) < need and max(len(mb.rows) for mb in mbs) > 1:
                big = max(mbs, key=lambda mb: len(mb.rows))
                mbs.remove(big)
                half = len(big.rows) // 2
                mbs += [make_micro_batch(batch, rows, **pad)
                        for rows in (big.rows[:half].tolist(), big.rows[half:].tolist())]
            # ... and a multiple of PP of them (megatron refuses a remainder below PP): empty ones make it up
            need = max(need, -(-len(mbs) // need) * need)
        mbs += [empty_micro_batch(batch, **pad) for _ in range(need - len(mbs))]
        if self.m.virtual_pipeline_parallel_size:
            # ... and exchanges fixed-shape tensors between stages: one shape for all micro-batches
            rows, width = max(mb.tokens.shape[0] for mb in mbs), max(mb.tokens.shape[1] for mb in mbs)
            mbs = [pad_micro_batch(mb, rows, width, num_experts=pad["num_experts"]) for mb in mbs]
        return mbs

    def _dp_max(self, n: int) -> int:
        """The largest micro-batch count `n` of the data-parallel ranks for an MoE model with DP > 1 (see
        _split); `n` itself otherwise. The same on every rank: all of them call it with their own count."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group()
        if not self.shape.is_moe or dist.get_world_size(group) == 1:
            return n
        count = torch.tensor([n], dtype=torch.long, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
        return int(count)

    # ------------------------------------------------------------------ commands
    def layout(self) -> tuple[int, int, int]:
        return self.tp_rank, self.pp_rank, self.dp_rank

    def logprobs(self, batch: Batch, temperature: float, reference: bool) -> Optional[torch.Tensor]:
        from nemo_prorl.policy.parallel import chunked_vocab_parallel_logprobs

        chunks = self.reference if reference else self.model
        if chunks is None:
            raise RuntimeError("this policy was built without a reference model (algo.kl_coef is 0)")
        out = torch.zeros(batch["response_mask"].shape, dtype=torch.float32)
        last = self._module(chunks[-1])
        # The output layer's weight, found while the chunk still is the last stage: megatron looks the tied
        # one up by post_process (switched off below), the embedding itself on one stage, the last stage's
        # copy of it with PP > 1. Only the last stage computes logprobs.
        if not last.post_process:
            weight = None
        elif last.share_embeddings_and_output_weights:
            weight = last.shared_embedding_or_output_weight()
        else:
            weight = last.output_layer.weight

        def loss_for(mb: MicroBatch, hidden: torch.Tensor) -> Any:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            if self.m.sequence_parallel:
                hidden = gather_from_sequence_parallel_region(hidden)
            per_pos = chunked_vocab_parallel_logprobs(hidden, weight, mb.labels.to(hidden.device), self.shape.vocab_size,
                                                      temperature=temperature)
            if len(mb.rows):  # (padding rows of a fixed-shape micro-batch come last)
                out[mb.rows] = response_values(per_pos.cpu(), mb)[: len(mb.rows)][: len(mb.rows)]
            return hidden.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        for c in chunks:
            c.eval()
        # the last stage returns its final hidden states: the logits are made a chunk at a time
        post_process, last.post_process = last.post_process, False
        try:
            with torch.no_grad():
                self._run_schedule(chunks, self._split(batch, self.m.logprob_micro_batch_tokens), loss_for,
                                   forward_only=True)
        finally:
            last.post_process = post_process
        return out if self.is_last and self.tp_rank == 0 else None

    def train_minibatch(self, batch: Batch, loss_fn: LossFn, temperature: float, lr: float) -> dict[str, float]:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        from nemo_prorl.policy.parallel import cuda_type_names, masked_vocab_logits_, vocab_parallel_entropy

        sums: dict[str, float] = defaultdict(float)

        def loss_for(mb: MicroBatch, logits: torch.Tensor) -> Any:
            x = masked_vocab_logits_(logits, self.shape.vocab_size, temperature)
            # entropy first: megatron's cross entropy works in place on its input. With a zero bonus the
            # entropy is a metric only, computed without a graph.
            with torch.set_grad_enabled(self.spec.entropy_grad):
                ent = response_values(vocab_parallel_entropy(x), mb)
            logp_pos = -vocab_parallel_cross_entropy(x, mb.labels.to(x.device))
            logp = response_values(logp_pos, mb)
            extras = {k: v.to(logp.device) for k, v in mb.extras.items()}
            loss, metrics = loss_fn(logp, ent, extras)
            for k, v in metrics.items():
                sums[k] += float(v)
            return loss, torch.tensor(1, dtype=torch.int), {}

        for c in self.model:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mbs = self._split(batch, self.m.micro_batch_tokens)
        with self._moe_step(mbs) as moe_metrics:
            self._run_schedule(self.model, mbs, loss_for, forward_only=False)
        with cuda_type_names():
            # megatron clips by a NaN norm as if it were small: look first, and drop a NaN/inf update
            # (it would poison the weights) instead of taking it. step() repeats these two cheap calls.
            found_inf = self.optimizer.prepare_grads()
            grad_norm = float("nan") if found_inf else float(self.optimizer.get_grad_norm())
            skipped = not math.isfinite(grad_norm)
            if not skipped:
                _, grad_norm, _ = self.optimizer.step()
        out = dict(sums) if self.is_last and self.tp_rank == 0 else {}
        out.update(grad_norm=grad_norm, update_skipped=float(skipped), **moe_metrics)
        return out

    @contextlib.contextmanager
    def _moe_step(self, mbs: list[MicroBatch]) -> Any:
        """Around a training schedule of an MoE model: the load-balancing losses' gradient scale, and the
        step's load-balancing metrics (filled in the yielded dict on exit; the same on every rank)."""
        metrics: dict[str, float] = {}
        if not self.shape.is_moe:
            yield metrics
            return
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from nemo_prorl.policy.megatron_moe import LoadMeter, aux_loss_scale

        tokens = torch.tensor([float(sum(mb.tokens.numel() for mb in mbs))], device=self.device)
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())
        with LoadMeter(self.model, self.shape.num_layers, self.shape.num_experts) as meter, \
                aux_loss_scale(1.0 / float(tokens), self.device):
            yield metrics
        metrics.update(meter.metrics(len(mbs), sequence_parallel=self.m.sequence_parallel, device=self.device))

    def reset_reference(self) -> None:
        if self.reference is not None:
            for ref, c in zip(self.reference, self.model):
                ref.load_state_dict(self._module(c).state_dict())

    def _inner_optimizers(self) -> list[torch.optim.Optimizer]:
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        return [o.optimizer for o in opts]

    def reset_optimizer(self) -> None:
        for opt in self._inner_optimizers():
            opt.state.clear()  # Adam moments and step counts start again, as in a fresh optimizer

    def export_shards(self) -> dict[tuple, dict[str, torch.Tensor]]:
        """This rank's Megatron weights for the export, keyed as in _own_shards: the dense part from DP rank
        0 only, the experts from expert-DP rank 0 only (under EP, a rank of DP rank > 0 holds experts no
        other exporting rank does). They reach the controller through Ray's object store."""
        from nemo_prorl.policy.megatron_moe import EXPERTS

        return {k: {n: t.cpu() for n, t in sd.items()} for k, sd in self._own_shards().items()
                if (self.edp_rank if len(k) == 4 and k[1] == EXPERTS else self.dp_rank) == 0}

    # ------------------------------------------------------------------ node-local weight sync
    def _own_shards(self) -> dict[tuple, dict[str, torch.Tensor]]:
        """This rank's live weights by (stage, TP rank), stage = chunk * PP + pipeline rank: no copies. An
        MoE model's experts are a shard of their own, (stage, EXPERTS, EP rank, expert-TP rank) (see
        policy/megatron_moe.py)."""
        from nemo_prorl.policy.megatron_moe import split_shard

        pp, out = self.m.pipeline_parallel_size, {}
        for i, c in enumerate(self.model):
            sd = {k: v.detach() for k, v in self._module(c).state_dict().items() if not k.endswith("_extra_state")}
            sd = from_te_names(sd) if self.te else sd
            out.update(split_shard(i * pp + self.pp_rank, self.tp_rank, self.ep_rank, self.etp_rank, sd,
                                   self.shape.is_moe))
        return out

    def shard_grid(self) -> tuple[int, int, int, int]:
        """(stages, TP, EP, expert-TP): the shape of the assembled shards."""
        return (self.m.pipeline_parallel_size * (self.m.virtual_pipeline_parallel_size or 1),
                self.m.tensor_parallel_size, self.ep, self.etp)

    # The node-local sync's commands (weight_sync/sync.py drives them): this rank's live shards, handed to
    # its sender (weight_sync/sender.py), which does the work.
    def _sender(self) -> Any:
        from nemo_prorl.weight_sync.sender import NodeLocalSender

        if getattr(self, "_weight_sender", None) is None:
            self._weight_sender = NodeLocalSender(self.device)
        return self._weight_sender

    def sync_meta(self) -> dict[tuple, list]:
        from nemo_prorl.weight_sync.sender import NodeLocalSender

        return NodeLocalSender.metas(self._own_shards())

    def sync_prepare(self, transfers: list, kinds: dict[int, set[str]], bucket_bytes: int, dtype: str, metas: dict) -> int:
        """Take part in the shard transfers; a leader then plans its node's buckets (the number of them)."""
        return self._sender().prepare(self.spec.rank, self._own_shards(), transfers, kinds, bucket_bytes, dtype,
                                      metas, self.shape, self.shard_grid())

    def join_transport(self, rendezvous: Any, prefix: str, size: int) -> None:
        """The gloo group with the weight relays of nodes without ranks (weight_sync/sender.py WeightRelay)."""
        self._sender().join_transport(rendezvous, prefix, self.spec.rank, size)

    def sync_pack(self, k: int) -> Optional[dict[str, tuple[tuple, list]]]:
        return self._sender().pack(k)

    def sync_end(self) -> None:
        self._sender().end()

    def state_dict(self) -> dict[str, Any]:
        """Everything for an exact resume on the same layout: weights, reference, optimizer state and the
        optimizer's own (main) copies of its parameters."""
        inner = self._inner_optimizers()
        return {"layout": (self.tp_rank, self.pp_rank, self.dp_rank), "experts": (self.ep, self.etp),
                "model": self._chunk_state(self.model),
                "reference": self._chunk_state(self.reference) if self.reference is not None else None,
                # copies: tensors sent to the controller move into shared memory, and a live Adam moment
                # shared with another process would be updated under it
                "optimizer": [copy.deepcopy(o.state_dict()) for o in inner],
                "main_params": [[p.detach().cpu().clone() for g in o.param_groups for p in g["params"]] for o in inner]}

    def _sharded_state(self, is_loading: bool = False) -> dict[str, Any]:
        """Megatron's sharded state dict of this rank: model chunks, reference chunks and the optimizer
        (the distributed optimizer in its "dp_reshardable" layout: every rank writes its own buffers)."""
        from nemo_prorl.policy import parallel

        sd: dict[str, Any] = {f"model{i}": self._module(c).sharded_state_dict() for i, c in enumerate(self.model)}
        model_sd = dict(sd) if len(sd) > 1 else sd["model0"]
        for i, c in enumerate(self.reference or []):
            sd[f"reference{i}"] = c.sharded_state_dict(prefix="reference.")
        self._fill_empty_optimizer_state()
        with parallel.cuda_type_names():
            sd["optimizer"] = self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
        return sd

    def _fill_empty_optimizer_state(self) -> None:
        """Adam's state as torch creates it before a first step (zero moments, step 0): the sharded
        optimizer state needs it on every parameter, and it changes nothing about the next update."""
        for opt in self._inner_optimizers():
            for group in opt.param_groups:
                for p in group["params"]:
                    if not opt.state[p]:
                        opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                            exp_avg_sq=torch.zeros_like(p))

    def save_state(self, path: str) -> None:
        """A Megatron distributed checkpoint (megatron.core.dist_checkpointing, torch_dist format): all ranks
        write their shards of the weights, reference and optimizer into `path` together."""
        from megatron.core import dist_checkpointing

        dist_checkpointing.save(self._sharded_state(), path)

    def load_state(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        from nemo_prorl.policy import parallel

        loaded = dist_checkpointing.load(self._sharded_state(is_loading=True), path)
        for i, c in enumerate(self.model):
            self._module(c).load_state_dict(loaded[f"model{i}"])
        for i, c in enumerate(self.reference or []):
            c.load_state_dict({k.removeprefix("reference."): v for k, v in loaded[f"reference{i}"].items()})
        # no_grad: with float32 weights the optimizer's main parameters are the model's own leaves
        with parallel.cuda_type_names(), torch.no_grad():
            self.optimizer.load_state_dict(loaded["optimizer"])
        self._restore_adam_steps()

    def _restore_adam_steps(self) -> None:
        """Without apex/TE (torch Adam, as on CPU) megatron-core 0.16 restores the Adam step count into
        param_groups only: its dp_reshardable loader then copies the step each parameter had *before* the
        load (0) back over it, so every update after a resume used the bias correction of a first step
        (found by comparing a resumed run's weights with an uninterrupted run's). Each parameter gets its
        own tensor: torch's Adam increments it in place."""
        for opt in self._inner_optimizers():
            for group in opt.param_groups:
                if "step" not in group:  # fused (apex/TE) Adam keeps its step in the group itself
                    continue
                for p in group["params"]:
                    if "step" in opt.state.get(p, {}):
                        opt.state[p]["step"] = torch.tensor(float(group["step"]))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # (state from before expert parallelism has no "experts": EP=1, expert-TP = TP)
        experts = tuple(state.get("experts") or (1, self.m.tensor_parallel_size))
        if tuple(state["layout"]) != (self.tp_rank, self.pp_rank, self.dp_rank) or experts != (self.ep, self.etp):
            here = (self.tp_rank, self.pp_rank, self.dp_rank)
            raise RuntimeError(f"state for rank layout {state['layout']} with (EP, expert-TP) {experts} given to rank "
                               f"{here} of (EP, expert-TP) {(self.ep, self.etp)}: resume with the same "
                               "policy.megatron parallel sizes")
        for c, sd in zip(self.model, state["model"]):
            self._load_shard(self._module(c), sd)
        if self.reference is not None and state["reference"] is not None:
            for c, sd in zip(self.reference, state["reference"]):
                self._load_shard(c, sd)
        with torch.no_grad():
            for o, sd, mains in zip(self._inner_optimizers(), state["optimizer"], state["main_params"]):
                o.load_state_dict(copy.deepcopy(sd))
                for p, saved in zip((p for g in o.param_groups for p in g["params"]), mains):
                    p.copy_(saved)


def _without_wandb() -> None:
    """In a rank's own process only (the controller's trackers need wandb): megatron-core's timers import wandb
    when it is installed, and the ranks never log to it (the trainer's trackers run on the controller). The
    import costs time and memory, and makes two temp folders (wandb-media, wandb-artifacts) that a rank stopped
    by a kill, as every rank is, leaves in /tmp. An entry of None makes the import fail as when wandb is not
    installed, which megatron-core handles (it then has no wandb writer)."""
    sys.modules.setdefault("wandb", None)  # type: ignore[arg-type]


class MegatronRank(ActorBase):
    """One rank as a Ray actor (placed by nemo_prorl.cluster): built by `start`, which meets the other ranks
    in the group's rendezvous actor (cluster/rendezvous.py), then serving the commands of MegatronWorker. A
    command's exception reaches the controller with its traceback (as a RayTaskError)."""

    def __init__(self, spec: WorkerSpec) -> None:
        _quiet_optional_dependency_warnings()
        _without_wandb()
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        ignore_preemption_signals()  # the controller checkpoints with these ranks first, then stops them
        self.spec = spec
        self.worker: Optional[MegatronWorker] = None

    def start(self, rendezvous: Any) -> tuple[int, int, int]:
        """Join the group through `rendezvous` (the handle of its key-value actor) and build this rank."""
        if self.node_info()["ip"] in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a loopback cluster: gloo's pairs on loopback too
        self.worker = MegatronWorker(self.spec, rendezvous)
        return self.worker.layout()

    def run(self, name: str, *args: Any) -> Any:
        if self.worker is None:
            raise RuntimeError("this rank has not been started")
        return getattr(self.worker, name)(*args)

    def stop(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
