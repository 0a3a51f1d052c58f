"""The placement plan: which node and device hosts each Megatron rank, each rollout engine and the reward
workers. A pure function of the configuration (`plan_from_config`), printed by `prorl plan`; everything
that starts processes only reads it.

Rules:
- Megatron ranks follow megatron-core's rank order (TP fastest, then PP, then DP) over the training
  devices, node by node: on GPUs a TP group never leaves its node (TP must divide the GPUs per node),
  pipeline stages come next, and data-parallel replicas spread over the nodes. CPU slots are logical, so
  there a TP group may span nodes (the tests use that to run TP's collectives across simulated nodes).
- Experts (MoE policies) use the same order (megatron's `tp-cp-ep-pp-dp`): expert-TP fastest, then EP,
  carved out of each pipeline stage's TP x DP ranks; with PP > 1, EP x expert-TP must equal TP. Expert-TP
  below TP without EP is refused (the experts' gradients would not be summed over TP).
- Colocated (cluster.rollout_nodes=0): engines of E devices each take E consecutive training devices of
  one node; they share the GPUs with the Megatron ranks and sleep during the update.
- Split: the last `rollout_nodes` nodes only generate; engines fill them.
- Split inside each node (cluster.rollout_devices_per_node=R): the last R devices of every node only
  generate (engines fill them, node by node); the Megatron ranks take the others.
- Asynchronous steps (algo.async.max_staleness > 0) generate while the policy updates, so the engines are
  actors (even a single torch engine) and must not share a device with a Megatron rank.
- Reward workers: the controller's process pools on node 0, or (cluster.rewards_on_every_node, default on
  several nodes) a reward-worker actor with its own pools on every node.
An impossible layout raises PlacementError naming the config key to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from nemo_prorl.config.schema import async_config


class PlacementError(ValueError):
    """A layout that cannot be placed; `key` is the config key to change."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Layout:
    """What a run asks for, in devices (GPUs, or CPU slots on a CPU cluster)."""

    kind: str  # "gpu" | "cpu"
    num_nodes: int
    devices_per_node: int
    rollout_nodes: int = 0
    megatron: Optional[tuple[int, int, Optional[int]]] = None  # (TP, PP, DP or None: fill); None: hf backend
    engine: str = "torch"  # rollout.engine
    engine_tp: int = 1
    num_engines: Optional[int] = 1  # None: as many as fit (vllm), 1 (torch)
    reward_workers: int = 0  # processes of the controller's reward pools
    rewards_on_every_node: bool = False  # a reward-worker actor per node (with those pools) instead
    rollout_devices_per_node: int = 0  # the last devices of each node that only generate (split inside a node)
    async_steps: bool = False  # algo.async.max_staleness > 0: engines generate during the update
    # (EP, expert-TP) of a mixture-of-experts policy, expert-TP resolved (null = TP); (1, TP) for dense ones
    experts: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class RankSlot:
    rank: int
    tp: int
    pp: int
    dp: int
    node: int
    device: int
    # the rank's place among the experts (megatron's expert groups, same order: expert-TP fastest, then EP,
    # then PP, then expert-DP): it holds experts [ep * E/EP, (ep + 1) * E/EP), split over expert-TP
    ep: int = 0
    etp: int = 0
    edp: int = 0


@dataclass(frozen=True)
class EngineSlot:
    index: int
    node: int
    devices: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    layout: Layout
    ranks: tuple[RankSlot, ...]  # empty: the policy lives in the controller (hf backend)
    engines: tuple[EngineSlot, ...]  # empty: the engine lives in the controller (torch engine, one process)
    data_parallel_size: Optional[int]

    @property
    def mode(self) -> str:
        """"split": rollout nodes; "split-node": rollout devices inside each node; "colocated": engines
        share the training devices."""
        if self.layout.rollout_nodes:
            return "split"
        return "split-node" if self.layout.rollout_devices_per_node else "colocated"

    @property
    def needs_ray(self) -> bool:
        """Anything beyond the controller's own process (Megatron ranks, engine actors) runs on Ray."""
        return bool(self.ranks or self.engines)

    def node_of_rank(self, rank: int) -> int:
        return self.ranks[rank].node


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise PlacementError(key, message)


def _unit(layout: Layout) -> str:
    return "GPUs" if layout.kind == "gpu" else "CPU slots"


def _key_dev(layout: Layout) -> str:
    return "cluster.gpus_per_node" if layout.kind == "gpu" else "cluster.cpu_slots_per_node"


def train_devices_per_node(layout: Layout) -> int:
    """The devices of a training node that the Megatron ranks use: the first ones, before the rollout devices."""
    return layout.devices_per_node - layout.rollout_devices_per_node


def data_parallel_size(layout: Layout) -> int:
    """DP of the Megatron layout: as given, or as many replicas as the training devices hold."""
    assert layout.megatron is not None
    tp, pp, dp = layout.megatron
    per, r, unit = train_devices_per_node(layout), layout.rollout_devices_per_node, _unit(layout)
    key_dev = _key_dev(layout)
    node = f"a node ({key_dev}={per})" if not r else \
        f"a node's training {unit} ({key_dev}={layout.devices_per_node} - cluster.rollout_devices_per_node={r})"
    if layout.kind == "gpu":  # TP's all-reduces need a node's NVLink; CPU slots have no such bound
        _check(tp <= per, "policy.megatron.tensor_parallel_size",
               f"TP={tp} is larger than {node}: a TP group must stay inside one node")
        _check(per % tp == 0, "policy.megatron.tensor_parallel_size",
               f"TP={tp} does not divide the {per} training {unit} of a node: TP groups would straddle nodes")
    train = (layout.num_nodes - layout.rollout_nodes) * per
    note = f" (cluster.rollout_devices_per_node={r} of each node only generate)" if r else ""
    if dp is None:
        _check(train % (tp * pp) == 0, "policy.megatron.data_parallel_size",
               f"null (fill the training {unit}): {train} {unit}{note} are not a multiple of TP x PP = {tp * pp}")
        return train // (tp * pp)
    _check(tp * pp * dp <= train, "policy.megatron.data_parallel_size",
           f"TP x PP x DP = {tp * pp * dp} ranks, but the training nodes have {train} {unit}{note}")
    return dp


def expert_sizes(layout: Layout) -> tuple[int, int]:
    """(EP, expert-TP) of the Megatron layout, after the checks: a layout megatron would refuse, or one
    that would train the experts wrongly without saying so, raises PlacementError naming the key."""
    assert layout.megatron is not None
    tp, pp, _ = layout.megatron
    ep, etp = layout.experts or (1, tp)
    k = "policy.megatron."
    _check(ep >= 1, k + "expert_parallel_size", "must be >= 1")
    _check(etp >= 1, k + "expert_tensor_parallel_size", "must be >= 1 or null (= tensor_parallel_size)")
    # Without EP megatron treats the experts' weights as dense ones (DDP all-reduces them over the dense DP
    # group, never over the expert groups), so expert-TP must be TP: below it each expert is replicated over
    # TP ranks whose gradients nothing sums (found by comparing with TP=1: silently wrong expert updates);
    # above it the dense DP group holds different expert-TP shards, whose gradients it would add together.
    why = ("leaves the experts' gradients unsummed over TP" if etp < tp else
           "makes megatron sum different expert-TP shards' gradients over the data-parallel group")
    _check(ep > 1 or etp == tp, k + "expert_tensor_parallel_size",
           f"expert-TP={etp} {'below' if etp < tp else 'above'} tensor_parallel_size={tp} with "
           f"expert_parallel_size=1 {why}: use expert_tensor_parallel_size=null (= TP) or expert_parallel_size > 1")
    dp = data_parallel_size(layout)
    _check((tp * dp) % (ep * etp) == 0, k + "expert_parallel_size",
           f"EP x expert-TP = {ep} x {etp} must divide TP x DP = {tp} x {dp} (the expert groups are carved out "
           "of each pipeline stage's ranks)")
    # megatron orders the expert groups like the dense ones (tp-cp-ep-pp-dp, pipeline before DP): with
    # PP > 1 its pipeline groups agree only when EP x expert-TP spans exactly a TP group
    _check(pp == 1 or ep * etp == tp, k + "expert_parallel_size",
           f"with pipeline_parallel_size={pp}, EP x expert-TP = {ep} x {etp} must equal tensor_parallel_size={tp} "
           "(the rank order keeps pipeline stages adjacent)")
    return ep, etp


def check_experts(num_experts: int, moe_ffn_hidden_size: int, ep: int, etp: int) -> None:
    """The model's experts against EP and expert-TP (known once the model's config is read)."""
    k = "policy.megatron."
    _check(ep == 1 or num_experts > 0, k + "expert_parallel_size",
           f"expert_parallel_size={ep}, but the model has no experts (a dense model)")
    _check(num_experts == 0 or num_experts % ep == 0, k + "expert_parallel_size",
           f"expert_parallel_size={ep} does not divide the model's {num_experts} experts")
    _check(num_experts == 0 or moe_ffn_hidden_size % etp == 0, k + "expert_tensor_parallel_size",
           f"expert-TP={etp} does not divide each expert's FFN size {moe_ffn_hidden_size}")


def engines_are_actors(layout: Layout) -> bool:
    """vLLM engines always are; the torch engine runs in the controller's process unless there are several,
    they have devices of their own (split), or they generate while the controller updates (async)."""
    return (layout.engine == "vllm" or (layout.num_engines or 1) > 1 or layout.rollout_nodes > 0
            or layout.rollout_devices_per_node > 0 or layout.async_steps)


def _engine_sites(layout: Layout) -> tuple[list[tuple[int, int]], str]:
    """(node, first device) of every engine that fits, in engine order, and where that is (for errors)."""
    per, e, r = layout.devices_per_node, layout.engine_tp, layout.rollout_devices_per_node
    _check(e <= per, "rollout.vllm.tensor_parallel_size",
           f"an engine of {e} devices is larger than a node ({_key_dev(layout)}={per})")
    if r:
        _check(r % e == 0, "cluster.rollout_devices_per_node",
               f"the last {r} device(s) of a node do not hold whole engines of {e} devices "
               f"(rollout.vllm.tensor_parallel_size={e})")
        nodes, first, where = range(layout.num_nodes), per - r, f"the last {r} device(s) of each node"
    else:
        _check(per % e == 0, "rollout.vllm.tensor_parallel_size",
               f"engines of {e} devices do not tile the {per} devices of a node")
        # colocated: every node (all of them train); split: the rollout nodes, the last ones
        nodes, first = range(layout.num_nodes - layout.rollout_nodes if layout.rollout_nodes else 0,
                             layout.num_nodes), 0
        where = f"the {layout.rollout_nodes} rollout node(s)" if layout.rollout_nodes else "the training devices"
    return [(n, d) for n in nodes for d in range(first, per, e)], where


def _engine_slots(layout: Layout) -> tuple[EngineSlot, ...]:
    if not engines_are_actors(layout):
        return ()  # one torch engine, in the controller's process
    e = layout.engine_tp
    fit, where = _engine_sites(layout)
    num = len(fit) if layout.num_engines is None else layout.num_engines
    _check(1 <= num <= len(fit), "rollout.num_engines", f"{num} engines of {e} device(s): {len(fit)} fit on {where}")
    if layout.megatron is None:  # the hf policy's weights are in the controller: its engines share its node
        _check(all(n == 0 for n, _ in fit[:num]), "rollout.num_engines",
               f"{num} engines of {e} device(s) do not fit on node 0, and with policy=hf the weights live in the "
               "controller's process on node 0 (policy=megatron syncs each node from its own ranks)")
    return tuple(EngineSlot(i, n, tuple(range(d, d + e))) for i, (n, d) in enumerate(fit[:num]))


def _check_split(layout: Layout) -> None:
    """Rollout nodes or rollout devices: the weights reach them from the Megatron ranks, and one of the two."""
    _check(0 <= layout.rollout_nodes < layout.num_nodes, "cluster.rollout_nodes",
           f"must be in [0, cluster.num_nodes={layout.num_nodes}): at least one node trains")
    _check(not layout.rollout_nodes or layout.megatron is not None, "cluster.rollout_nodes",
           "split mode needs policy=megatron (the weights reach the rollout nodes from the Megatron ranks)")
    r, per = layout.rollout_devices_per_node, layout.devices_per_node
    _check(0 <= r < per, "cluster.rollout_devices_per_node",
           f"must be in [0, {_key_dev(layout)}={per}): at least one device of each node trains")
    _check(not r or layout.megatron is not None, "cluster.rollout_devices_per_node",
           "a split inside each node needs policy=megatron (the engines take their weights from the Megatron "
           "ranks of their node)")
    _check(not (r and layout.rollout_nodes), "cluster.rollout_devices_per_node",
           f"cannot be combined with cluster.rollout_nodes={layout.rollout_nodes}: choose whole rollout nodes or "
           "rollout devices inside each node")


def _check_async(layout: Layout) -> None:
    """Asynchronous steps generate while the policy updates: an engine on a device that trains would fight
    the update for its memory (colocated engines give theirs up by sleeping, which async cannot)."""
    if not layout.async_steps:
        return
    own = "give the engines devices of their own with cluster.rollout_nodes or cluster.rollout_devices_per_node"
    if layout.megatron is not None:
        _check(layout.rollout_nodes > 0 or layout.rollout_devices_per_node > 0, "algo.async.max_staleness",
               f"asynchronous steps generate during the update, but the engines would share the training devices "
               f"with the Megatron ranks (colocated): {own}")
    else:  # on CPU the engine actors are processes of their own; a GPU would hold the policy and an engine
        _check(layout.kind == "cpu", "algo.async.max_staleness",
               "asynchronous steps generate during the update, but with policy=hf on cuda the policy trains on "
               "GPU 0 of node 0, which the engines would share: use policy=megatron and " + own)


def make_plan(layout: Layout) -> Plan:
    """The placement of every actor of a run (see the module docstring for the rules)."""
    _check(layout.num_nodes >= 1, "cluster.num_nodes", "must be >= 1")
    _check(layout.devices_per_node >= 1, _key_dev(layout), "must be >= 1")
    _check_split(layout)
    _check_async(layout)
    ranks: list[RankSlot] = []
    dp = None
    if layout.megatron is not None:
        tp, pp, _ = layout.megatron
        dp = data_parallel_size(layout)
        ep, etp = expert_sizes(layout)
        per = train_devices_per_node(layout)  # the first devices of each node; the rest generate
        for r in range(tp * pp * dp):  # megatron-core's order: TP fastest, then PP, then DP
            ranks.append(RankSlot(r, tp=r % tp, pp=(r // tp) % pp, dp=r // (tp * pp), node=r // per, device=r % per,
                                  ep=(r // etp) % ep, etp=r % etp, edp=r // (etp * ep * pp)))
    return Plan(layout, tuple(ranks), _engine_slots(layout), dp)


def layout_from_config(cfg: Any, *, backend: Optional[str] = None, engine: Optional[str] = None) -> Layout:
    """The Layout of a ProRLConfig (or its DictConfig); `backend` / `engine` stand in for policy.backend
    and rollout.engine (a backend built directly, as the tests do)."""
    c, m = cfg.cluster, cfg.policy.megatron
    backend, engine = backend or cfg.policy.backend, engine or cfg.rollout.engine
    kind = "gpu" if str(c.device).startswith("cuda") else "cpu"
    meg = (m.tensor_parallel_size, m.pipeline_parallel_size, m.data_parallel_size) if backend == "megatron" else None
    experts = ((m.expert_parallel_size, m.expert_tensor_parallel_size or m.tensor_parallel_size)
               if backend == "megatron" else None)
    engine_tp = cfg.rollout.vllm.tensor_parallel_size if engine == "vllm" else 1
    split = c.rollout_devices_per_node
    one_machine = kind == "cpu" and c.cpu_slots_per_node is None
    if kind == "gpu":
        per = c.gpus_per_node
    elif not one_machine:
        per = c.cpu_slots_per_node
    else:  # one CPU machine: as many slots as the run needs
        _check(c.num_nodes == 1, "cluster.cpu_slots_per_node", "must be set for a CPU cluster of several nodes")
        need = meg[0] * meg[1] * (meg[2] or 1) if meg else 1
        # engines on rollout slots of their own come after the ranks' slots; colocated they share them
        per = need + split if split > 0 else max(need, engine_tp * (cfg.rollout.num_engines or 1), 1)
    num_engines = cfg.rollout.num_engines
    # null: fill the rollout devices (split inside a node); else one where nothing is there to fill: the torch
    # engine in the controller, the hf policy's one device, one CPU machine sized to the run
    if num_engines is None and split <= 0 and (engine != "vllm" or meg is None or one_machine):
        num_engines = 1
    r = cfg.reward
    workers = r.math.num_workers + r.reasoning_gym.num_workers + r.sandbox.num_workers
    return Layout(kind=kind, num_nodes=c.num_nodes, devices_per_node=per, rollout_nodes=c.rollout_nodes,
                  megatron=meg, engine=engine, engine_tp=engine_tp, num_engines=num_engines,
                  reward_workers=workers, rewards_on_every_node=c.num_nodes > 1 if c.rewards_on_every_node is None
                  else bool(c.rewards_on_every_node), rollout_devices_per_node=split,
                  async_steps=async_config(cfg).max_staleness > 0, experts=experts)


def plan_from_config(cfg: Any, **kw: Any) -> Plan:
    return make_plan(layout_from_config(cfg, **kw))


def _mode_line(lay: Layout) -> str:
    if lay.rollout_nodes:
        mode = f"split: the last {lay.rollout_nodes} node(s) only generate"
    elif lay.rollout_devices_per_node:
        mode = (f"split inside each node: the last {lay.rollout_devices_per_node} {_unit(lay)} of each training "
                "node only generate")
    else:  # async: the engines cannot give their memory up while they generate during the update
        mode = "colocated: engines share the training devices" + ("" if lay.async_steps else
                                                                    " and sleep during the update")
    return mode + ("; asynchronous steps: the engines generate during the update" if lay.async_steps else "")


def _has_ep(lay: Layout) -> bool:
    return lay.experts is not None and lay.experts[0] > 1


def _expert_lines(plan: Plan) -> list[str]:
    """The expert-parallel groups (only where EP or expert-TP differs from the dense layout)."""
    tp = plan.layout.megatron[0]  # type: ignore[index]
    ep, etp = plan.layout.experts or (1, tp)
    if ep == 1 and etp == tp:
        return []
    groups: dict[tuple[int, int, int], list[int]] = {}
    for r in plan.ranks:  # an EP group: the ranks of one (pipeline stage, expert-DP, expert-TP) position
        groups.setdefault((r.pp, r.edp, r.etp), []).append(r.rank)
    edp = len(plan.ranks) // (ep * etp * plan.layout.megatron[1])  # type: ignore[index]
    shown = "; ".join("[" + ",".join(map(str, g)) + "]" for g in list(groups.values())[:8])
    more = f" (+{len(groups) - 8} more)" if len(groups) > 8 else ""
    return [f"experts: EP={ep} expert-TP={etp} expert-DP={edp}; EP groups (ranks): {shown}{more}"]


def format_plan(plan: Plan) -> str:
    """The table `prorl plan` prints: one line per device in use, then the engines and reward workers."""
    lay = plan.layout
    dev = "gpu" if lay.kind == "gpu" else "cpu"
    lines = [f"cluster: {lay.num_nodes} node(s) x {lay.devices_per_node} {_unit(lay)}; {_mode_line(lay)}"]
    if plan.ranks:
        tp, pp, _ = lay.megatron  # type: ignore[misc]
        lines.append(f"policy: megatron, TP={tp} PP={pp} DP={plan.data_parallel_size}: {len(plan.ranks)} ranks "
                     "(Ray actors)")
        lines += _expert_lines(plan)
    else:
        lines.append("policy: hf, in the controller's process (node 0)")
    if plan.engines:
        lines.append(f"rollout: {len(plan.engines)} {lay.engine} engine(s) of {lay.engine_tp} device(s) (Ray actors)")
    else:
        lines.append(f"rollout: the {lay.engine} engine, in the controller's process (node 0)")
    if lay.rewards_on_every_node:
        lines.append(f"controller: node 0; rewards: a reward-worker actor on each of the {lay.num_nodes} nodes, "
                     f"{lay.reward_workers} verifier processes each")
    else:
        lines.append(f"controller: node 0; reward workers: {lay.reward_workers} processes on node 0")
    engine_at = {(e.node, d): e.index for e in plan.engines for d in e.devices}
    rank_at = {(r.node, r.device): r for r in plan.ranks}
    lines.append(f"{'node':>4}  {'device':<7} {'megatron rank (tp,pp,dp)':<26} engine")
    for n in range(lay.num_nodes):
        for d in range(lay.devices_per_node):
            r, e = rank_at.get((n, d)), engine_at.get((n, d))
            if r is None and e is None:
                continue
            rank = f"{r.rank} ({r.tp},{r.pp},{r.dp})" + (f" ep{r.ep}" if r and _has_ep(lay) else "") if r else "-"
            lines.append(f"{n:>4}  {dev}{d:<4} {rank:<26} {'-' if e is None else e}")
    return "\n".join(lines)
