"""`policy.backend=megatron`: the policy update on megatron-core, behind the same interface as the
transformers backend.

The trainer stays one process (a single controller, as in verl): each rank (tensor x pipeline x data
parallel, see policy/megatron_worker.py) is a Ray actor placed by the cluster plan (nemo_prorl/cluster);
this class sends every command to all of them and gathers the answers. Data parallelism splits a
mini-batch's rows; the loss normalisers are the mini-batch totals and gradients are summed over ranks, so
the update does not depend on the layout. A mini-batch with fewer rows than DP replicas leaves some of them
none: those run an empty, fully masked micro-batch (MegatronWorker._split), which takes part in every
collective and adds nothing to the loss, the gradients or the metrics (an MoE model's DP ranks also run
as many micro-batches as the busiest of them: their expert group's dispatch is a collective). A rank that fails or dies stops the
whole group and raises MegatronWorkerError naming the rank, its node and the command.

For the node-local weight sync it only says what it holds (`shard_layout`, `rank_sites`, `rank_group`):
the protocol is weight_sync/sync.py's, which drives the ranks' sync commands itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from nemo_prorl.cluster.actors import ActorError
from nemo_prorl.cluster.plan import check_experts
from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.policy.base import POLICY_BACKENDS, STATE_FILE, Batch, LazyWeight, LossFn, PolicyBackend
from nemo_prorl.policy.megatron_convert import ModelShape, megatron_to_hf_lazy
from nemo_prorl.policy.megatron_worker import MegatronRank, WorkerSpec
from nemo_prorl.weight_sync.sender import ShardKey, ShardMeta
from nemo_prorl.weight_sync.sync import NodeLocalSource, RankGroup

log = logging.getLogger("nemo_prorl")


class MegatronWorkerError(ActorError):
    pass


def check_routed_experts(batch: Batch, shape: ModelShape) -> None:
    """Refuse a batch whose `routed_experts` (rollout.routing_replay) do not fit the model, here on the
    controller: a rank that refused it alone would leave its pipeline and expert-parallel peers waiting in
    the schedule's collectives. Every layer of a Megatron MoE policy is an MoE layer (ModelShape)."""
    routed = batch.get("routed_experts")
    if routed is None:
        return
    if not shape.is_moe:
        raise ValueError("the batch carries routed_experts (rollout.routing_replay), but the policy has no MoE layers")
    want = (*batch["input_ids"].shape, shape.num_layers, shape.moe_topk)
    if tuple(routed.shape) != want:
        raise ValueError(f"rollout.routing_replay: routed_experts of shape {tuple(routed.shape)} do not fit the "
                         f"policy (expected {want}: rows, positions, {shape.num_layers} MoE layers, "
                         f"top-{shape.moe_topk})")
    if routed.numel() and (int(routed.min()) < 0 or int(routed.max()) >= shape.num_experts):
        raise ValueError(f"rollout.routing_replay: routed_experts name experts in [{int(routed.min())}, "
                         f"{int(routed.max())}], the policy has experts [0, {shape.num_experts})")


def check_resume_layout(state: dict[str, Any], layout: list[tuple[int, int, int]], experts: tuple[int, int],
                        tp: int) -> None:
    """Refuse policy state saved on another layout: the ranks' (tp, pp, dp) and the expert layout (EP,
    expert-TP), whose shards of the experts and their optimizer state differ. State from before expert
    parallelism has no `experts`: it was EP=1 with expert-TP = TP."""
    saved = [tuple(x) for x in state["layout"]]
    saved_experts = tuple(state.get("experts") or (1, tp))
    if saved != layout or saved_experts != tuple(experts):
        raise ValueError(f"policy state was saved with rank layout {state['layout']} and (EP, expert-TP) "
                         f"{saved_experts}, this run has {layout} and {tuple(experts)}: resume with the same "
                         "policy.megatron parallel sizes")


class MegatronPolicy(PolicyBackend, NodeLocalSource):
    def __init__(self, cfg: ProRLConfig, model_dir: Path, *, use_reference: bool) -> None:
        from transformers import AutoConfig

        from nemo_prorl import cluster
        from nemo_prorl.cluster.actors import start_group
        from nemo_prorl.cluster.rendezvous import start_rendezvous

        self.cfg = cfg
        self.model_dir = Path(model_dir)
        m = self.m = cfg.policy.megatron
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        self.shape = ModelShape.from_hf_config(self.hf_config)
        self.step = 0  # optimizer steps taken, for the warmup
        self.group = None
        plan = cluster.plan_from_config(cfg, backend="megatron")
        # the model's experts against EP and expert-TP (the plan checked the layout itself)
        self.ep, self.etp = plan.layout.experts or (1, m.tensor_parallel_size)
        check_experts(self.shape.num_experts, self.shape.moe_ffn_hidden_size, self.ep, self.etp)
        self.world = len(plan.ranks)
        self.dp = plan.data_parallel_size
        self.rank_nodes = [r.node for r in plan.ranks]
        self._rank_sites = [(r.node, r.device) for r in plan.ranks]
        self._sync_layout: Optional[tuple] = None
        self._rank_group: Optional[RankGroup] = None
        self._rendezvous: Any = None
        self._session = cluster.session(cfg, plan)
        self._placement = self._session.place(plan, cfg.cluster.ray_timeout_s)
        per_node = max(1, sum(1 for r in plan.ranks if r.node == 0))
        threads = cfg.cluster.num_threads or max(1, torch.get_num_threads() // per_node)
        specs = [WorkerSpec(rank=r.rank, world_size=self.world, model_dir=str(model_dir), megatron=m,
                            optim=cfg.policy.optim, dtype=cfg.model.dtype, seed=cfg.trainer.seed,
                            use_reference=use_reference, num_threads=threads, entropy_grad=cfg.algo.entropy_coef > 0)
                 for r in plan.ranks]
        engine_devices = {(e.node, d) for e in plan.engines for d in e.devices}
        # a device shared with an engine (colocated) gives each half of it
        slots = [(r.node, r.device, 0.5 if (r.node, r.device) in engine_devices else 1.0) for r in plan.ranks]
        try:
            self.group = start_group("megatron rank", MegatronRank, self._placement, slots,
                                     init_args=[(s,) for s in specs], timeout_s=m.worker_timeout_s,
                                     env={"OMP_NUM_THREADS": str(threads)}, error_type=MegatronWorkerError)
            # the group meets in a key-value actor of its own, reachable with the cluster's token only
            self._rendezvous = start_rendezvous()
            # (tp, pp, dp) of each rank, as megatron laid out the process groups
            self.layout: list[tuple[int, int, int]] = [tuple(x) for x in self._call_all("start", self._rendezvous)]
        except BaseException:
            self.close()
            raise
        expected = [(r.tp, r.pp, r.dp) for r in plan.ranks]
        if self.layout != expected:
            self.close()
            raise MegatronWorkerError(f"megatron laid the ranks out as {self.layout}, the plan says {expected}")

    # ------------------------------------------------------------------ talking to the ranks
    def _call(self, name: str, per_rank_args: list[tuple]) -> list[Any]:
        if self.group is None:
            raise MegatronWorkerError("the megatron ranks have been shut down")
        method = "start" if name == "start" else "run"
        args = per_rank_args if name == "start" else [(name, *a) for a in per_rank_args]
        return self.group.call(method, args, timeout_s=self.m.worker_timeout_s, label=name)

    def _call_all(self, name: str, *args: Any) -> list[Any]:
        return self._call(name, [args] * self.world)

    def _dp_rows(self, n: int) -> list[torch.Tensor]:
        """Each DP replica's rows, as even as they go; with n < DP the last replicas get none."""
        return list(torch.arange(n).tensor_split(self.dp))

    def _per_rank_batches(self, batch: Batch) -> list[Any]:
        """Each rank gets the rows of its data-parallel replica (all of its TP/PP peers the same rows), put
        into Ray's object store once per replica."""
        import ray

        n = batch["input_ids"].shape[0]
        parts = [ray.put({k: v[rows] for k, v in batch.items()}) for rows in self._dp_rows(n)]
        return [parts[dp] for _, _, dp in self.layout]

    def _output_ranks(self) -> list[int]:
        """Per DP replica, in DP order, the rank that holds the loss: last pipeline stage, TP rank 0."""
        last = self.m.pipeline_parallel_size - 1
        by_dp = {dp: r for r, (tp, pp, dp) in enumerate(self.layout) if tp == 0 and pp == last}
        return [by_dp[d] for d in range(self.dp)]

    # ------------------------------------------------------------------ PolicyBackend
    def logprobs(self, batch: Batch, *, temperature: float, reference: bool = False) -> torch.Tensor:
        check_routed_experts(batch, self.shape)
        out = self._call("logprobs", [(b, temperature, reference) for b in self._per_rank_batches(batch)])
        return torch.cat([out[r] for r in self._output_ranks()])

    def _lr(self) -> float:
        o = self.cfg.policy.optim
        # ProRL §3.2: constant learning rate, after an optional linear warmup (as the hf backend)
        return o.lr * (min(1.0, (self.step + 1) / o.warmup_steps) if o.warmup_steps else 1.0)

    def train_minibatch(self, batch: Batch, loss_fn: LossFn, *, temperature: float) -> dict[str, float]:
        check_routed_experts(batch, self.shape)
        lr = self._lr()
        out = self._call("train_minibatch", [(b, loss_fn, temperature, lr) for b in self._per_rank_batches(batch)])
        metrics: dict[str, float] = {}
        for r in self._output_ranks():  # loss metrics are already normalised by mini-batch totals: sum them
            for k, v in out[r].items():
                if k not in ("grad_norm", "update_skipped") and not k.startswith("moe_"):
                    metrics[k] = metrics.get(k, 0.0) + v
        # load-balancing metrics (MoE) are reduced over all ranks by the ranks themselves
        metrics.update({k: v for k, v in out[0].items() if k.startswith("moe_")})
        grad_norm = out[0]["grad_norm"]
        skipped = out[0]["update_skipped"]
        if not skipped:
            self.step += 1
        return dict(metrics, grad_norm=grad_norm, lr=lr, update_skipped=skipped)

    def reset_reference(self) -> None:
        self._call_all("reset_reference")

    def reset_optimizer(self) -> None:
        self._call_all("reset_optimizer")
        self.step = 0

    def _grid(self) -> tuple[int, int, int, int]:
        """(stages, TP, EP, expert-TP); with an interleaved pipeline, stage = chunk * PP + pipeline rank."""
        m = self.m
        return (m.pipeline_parallel_size * (m.virtual_pipeline_parallel_size or 1), m.tensor_parallel_size,
                self.ep, self.etp)

    def _shards(self) -> tuple[list[list[dict[str, torch.Tensor]]], Optional[list]]:
        """(shards[stage][tp rank], experts[stage][ep rank][expert-TP rank] or None for a dense model):
        each dense shard from a rank of DP rank 0, each expert shard from one of expert-DP rank 0, so every
        expert comes exactly once."""
        from nemo_prorl.policy.megatron_moe import assemble

        items: dict[tuple, dict[str, torch.Tensor]] = {}
        for shards in self._call_all("export_shards"):
            items.update(shards)
        return assemble(items, *self._grid(), self.shape.is_moe)

    def lazy_weights(self) -> Iterator[LazyWeight]:
        # The shards are the workers' live parameters, mapped through shared memory (no copy after the
        # first sync), so each full tensor is built exactly once, in the rollout engine's buffer.
        stages, experts = self._shards()
        yield from megatron_to_hf_lazy(stages, self.shape, experts)

    # ------------------------------------------------------------------ NodeLocalSource (weight_sync/sync.py)
    def shard_layout(self) -> tuple[list[list[ShardKey]], list[int], dict[ShardKey, ShardMeta]]:
        if self._sync_layout is None:  # the shapes never change: asked once
            per_rank = self._call_all("sync_meta")
            self._sync_layout = ([list(m) for m in per_rank], self.rank_nodes,
                                 {k: v for m in per_rank for k, v in m.items()})
        return self._sync_layout

    def rank_sites(self) -> list[tuple[int, int]]:
        return self._rank_sites

    def rank_group(self) -> RankGroup:
        if self.group is None:
            raise MegatronWorkerError("the megatron ranks have been shut down")
        if self._rank_group is None:  # one for the ranks' life: the sync keeps its transport state in it
            self._rank_group = RankGroup(self.group, self._rendezvous, self.world, self.shape, self._grid(),
                                         self.m.worker_timeout_s, self.cfg.cluster.ray_timeout_s)
        return self._rank_group

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for w in self.lazy_weights():
            yield w.name, w.materialize(torch.empty(w.shape, dtype=w.dtype))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        self.hf_config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.named_weights()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "layout": self.layout, "experts": (self.ep, self.etp),
                "ranks": self._call_all("state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resume_layout(state, self.layout, (self.ep, self.etp), self.m.tensor_parallel_size)
        self._call("load_state_dict", [(s,) for s in state["ranks"]])
        self.step = state["step"]

    def save_state(self, path: Path) -> None:
        """A Megatron distributed checkpoint under `path/megatron/`, written by all ranks together; on
        several nodes `path` must be on a shared file system."""
        (path / "megatron").mkdir()
        self._call_all("save_state", str(path / "megatron"))
        torch.save({"step": self.step, "layout": self.layout, "experts": (self.ep, self.etp),
                    "format": "megatron_dist"}, path / STATE_FILE)

    def load_state(self, path: Path) -> None:
        state = torch.load(path / STATE_FILE, weights_only=True)  # step, layout, format: nothing to unpickle
        check_resume_layout(state, self.layout, (self.ep, self.etp), self.m.tensor_parallel_size)
        self._call_all("load_state", str(path / "megatron"))
        self.step = state["step"]

    def close(self) -> None:
        group, self.group = self.group, None
        if group is not None and group.actors:
            try:  # leave the process group cleanly; a rank stuck in a collective is killed regardless
                group.call_all("stop", timeout_s=10)
            except ActorError:
                pass
            group.kill()
        rendezvous, self._rendezvous = getattr(self, "_rendezvous", None), None
        if rendezvous is not None:
            from nemo_prorl.cluster.rendezvous import stop_rendezvous

            stop_rendezvous(rendezvous)
        placement, self._placement = getattr(self, "_placement", None), None
        if placement is not None:
            self._session.release(placement)

    def __del__(self) -> None:
        if getattr(self, "group", None) is not None:
            self.close()


@POLICY_BACKENDS.register("megatron")
def build_megatron_policy(cfg: ProRLConfig, model_dir: Path) -> PolicyBackend:
    return MegatronPolicy(cfg, model_dir, use_reference=cfg.algo.kl_coef > 0)
