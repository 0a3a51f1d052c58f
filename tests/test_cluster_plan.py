"""The placement plan (nemo_prorl/cluster/plan.py): golden layouts, impossible ones named by their key, and
`prorl plan`. Pure functions: no Ray here."""

import re

import pytest

from nemo_prorl.cli import main
from nemo_prorl.cluster.plan import Layout, PlacementError, format_plan, make_plan, plan_from_config
from nemo_prorl.config.loader import ConfigError, load_config


def ranks(plan):
    return [(r.rank, r.node, r.device, r.tp, r.pp, r.dp) for r in plan.ranks]


def engines(plan):
    return [(e.index, e.node, e.devices) for e in plan.engines]


def test_one_cpu_machine_embedded_default_needs_no_ray():
    cfg, _ = load_config([])
    plan = plan_from_config(cfg)
    assert plan.ranks == () and plan.engines == () and not plan.needs_ray
    assert plan.layout == Layout(kind="cpu", num_nodes=1, devices_per_node=1, megatron=None, engine="torch",
                                 reward_workers=8)


def test_one_cpu_machine_megatron_tp2_and_a_vllm_engine():
    cfg, _ = load_config(["policy=megatron", "policy.megatron.tensor_parallel_size=2", "rollout=vllm"])
    plan = plan_from_config(cfg)
    assert ranks(plan) == [(0, 0, 0, 0, 0, 0), (1, 0, 1, 1, 0, 0)]
    assert engines(plan) == [(0, 0, (0,))] and plan.needs_ray and plan.mode == "colocated"


def test_one_node_of_8_gpus_tp2_pp2_dp2():
    plan = make_plan(Layout("gpu", 1, 8, megatron=(2, 2, 2), engine="vllm"))
    # TP fastest, then PP, then DP: TP pairs on neighbouring GPUs, stages next, replicas last
    assert ranks(plan) == [(0, 0, 0, 0, 0, 0), (1, 0, 1, 1, 0, 0), (2, 0, 2, 0, 1, 0), (3, 0, 3, 1, 1, 0),
                           (4, 0, 4, 0, 0, 1), (5, 0, 5, 1, 0, 1), (6, 0, 6, 0, 1, 1), (7, 0, 7, 1, 1, 1)]
    assert engines(plan) == [(0, 0, (0,))]


def test_prorl_cluster_4x8_colocated():
    plan = make_plan(Layout("gpu", 4, 8, megatron=(1, 1, None), engine="vllm", num_engines=32))
    assert plan.data_parallel_size == 32 and len(plan.ranks) == 32
    assert [(r.node, r.device, r.dp) for r in plan.ranks[7:10]] == [(0, 7, 7), (1, 0, 8), (1, 1, 9)]
    # one TP=1 engine on every training GPU, beside its rank
    assert engines(plan) == [(i, i // 8, (i % 8,)) for i in range(32)]


def test_engines_fill_the_devices_unless_given():
    # null: vLLM engines on every training GPU (with megatron); the hf policy keeps one, on its node
    assert len(make_plan(Layout("gpu", 4, 8, megatron=(2, 1, None), engine="vllm", num_engines=None)).engines) == 32
    cfg, _ = load_config(["policy=megatron", "rollout=vllm", "cluster.cpu_slots_per_node=3"])
    assert engines(plan_from_config(cfg)) == [(0, 0, (0,)), (1, 0, (1,)), (2, 0, (2,))]
    cfg, _ = load_config(["policy=megatron", "policy.megatron.data_parallel_size=2", "rollout=vllm"])
    assert engines(plan_from_config(cfg)) == [(0, 0, (0,))]  # one CPU machine, slots as the ranks need: one
    cfg, _ = load_config(["rollout=vllm", "cluster.device=cuda", "cluster.gpus_per_node=8"])
    assert engines(plan_from_config(cfg)) == [(0, 0, (0,))]


def test_torch_engines_are_actors_when_there_are_several():
    cfg, _ = load_config(["rollout.num_engines=3"])
    plan = plan_from_config(cfg)
    assert engines(plan) == [(0, 0, (0,)), (1, 0, (1,)), (2, 0, (2,))] and plan.needs_ray
    assert "rollout: 3 torch engine(s) of 1 device(s) (Ray actors)" in format_plan(plan)
    assert plan_from_config(load_config(["rollout.num_engines=1"])[0]).engines == ()  # in the controller


def test_hf_policy_engines_stay_on_the_controllers_node():
    with pytest.raises(PlacementError, match="with policy=hf the weights live in the controller") as e:
        make_plan(Layout("cpu", 2, 1, engine="torch", num_engines=2))
    assert e.value.key == "rollout.num_engines"
    assert engines(make_plan(Layout("cpu", 2, 1, megatron=(1, 1, None), engine="torch", num_engines=2))) == \
        [(0, 0, (0,)), (1, 1, (0,))]


def test_4x8_with_one_rollout_node_is_split():
    plan = make_plan(Layout("gpu", 4, 8, rollout_nodes=1, megatron=(2, 1, None), engine="vllm", num_engines=8))
    assert plan.mode == "split" and plan.data_parallel_size == 12
    assert {r.node for r in plan.ranks} == {0, 1, 2}  # the rollout node trains nothing
    assert engines(plan) == [(i, 3, (i,)) for i in range(8)]


def test_engines_of_8_gpus():
    plan = make_plan(Layout("gpu", 4, 8, megatron=(8, 1, None), engine="vllm", engine_tp=8, num_engines=4))
    assert engines(plan) == [(n, n, tuple(range(8))) for n in range(4)]
    assert [(r.node, r.tp, r.dp) for r in plan.ranks if r.device == 0] == [(n, 0, n) for n in range(4)]
    text = format_plan(plan)
    assert "4 vllm engine(s) of 8 device(s)" in text and "   3  gpu7    31 (7,0,3)" in text


@pytest.mark.parametrize("layout,key,why", [
    (Layout("gpu", 4, 8, megatron=(16, 1, None)), "policy.megatron.tensor_parallel_size", "larger than a node"),
    (Layout("gpu", 4, 8, megatron=(3, 1, None)), "policy.megatron.tensor_parallel_size", "does not divide"),
    (Layout("gpu", 4, 8, megatron=(1, 3, None)), "policy.megatron.data_parallel_size", "not a multiple of TP x PP = 3"),
    (Layout("gpu", 1, 8, megatron=(2, 1, 8)), "policy.megatron.data_parallel_size", "16 ranks, but the training nodes have 8"),
    (Layout("gpu", 1, 8, engine="vllm", engine_tp=16), "rollout.vllm.tensor_parallel_size", "larger than a node"),
    (Layout("gpu", 1, 8, engine="vllm", engine_tp=3), "rollout.vllm.tensor_parallel_size", "do not tile"),
    (Layout("gpu", 4, 8, rollout_nodes=1, megatron=(1, 1, None), engine="vllm", num_engines=9), "rollout.num_engines",
     "9 engines of 1 device(s): 8 fit"),
    (Layout("gpu", 2, 8, rollout_nodes=2, engine="vllm"), "cluster.rollout_nodes", "at least one node trains"),
    (Layout("gpu", 2, 8, rollout_nodes=1, engine="vllm"), "cluster.rollout_nodes", "split mode needs policy=megatron"),
    (Layout("gpu", 1, 0), "cluster.gpus_per_node", "must be >= 1"),
    (Layout("gpu", 1, 2, megatron=(1, 1, None), engine="vllm", rollout_devices_per_node=2),
     "cluster.rollout_devices_per_node", "at least one device of each node trains"),
    (Layout("gpu", 1, 8, megatron=(1, 1, None), engine="vllm", rollout_devices_per_node=-1),
     "cluster.rollout_devices_per_node", "must be in [0, cluster.gpus_per_node=8)"),
    (Layout("gpu", 1, 8, megatron=(1, 1, None), engine="vllm", engine_tp=2, rollout_devices_per_node=3),
     "cluster.rollout_devices_per_node", "the last 3 device(s) of a node do not hold whole engines of 2 devices"),
    (Layout("gpu", 1, 8, megatron=(1, 1, None), engine="vllm", engine_tp=4, rollout_devices_per_node=2),
     "cluster.rollout_devices_per_node", "do not hold whole engines of 4 devices"),
    (Layout("gpu", 1, 8, engine="vllm", rollout_devices_per_node=2), "cluster.rollout_devices_per_node",
     "a split inside each node needs policy=megatron"),
    (Layout("gpu", 2, 8, rollout_nodes=1, megatron=(1, 1, None), engine="vllm", rollout_devices_per_node=2),
     "cluster.rollout_devices_per_node", "cannot be combined with cluster.rollout_nodes=1"),
    (Layout("gpu", 1, 8, megatron=(4, 1, None), engine="vllm", rollout_devices_per_node=2),
     "policy.megatron.tensor_parallel_size", "TP=4 does not divide the 6 training GPUs of a node"),
    (Layout("gpu", 1, 8, megatron=(2, 1, 4), engine="vllm", rollout_devices_per_node=2),
     "policy.megatron.data_parallel_size", "8 ranks, but the training nodes have 6 GPUs"),
    (Layout("gpu", 1, 8, megatron=(1, 1, None), engine="vllm", num_engines=3, rollout_devices_per_node=2),
     "rollout.num_engines", "3 engines of 1 device(s): 2 fit on the last 2 device(s) of each node"),
    (Layout("gpu", 1, 8, megatron=(1, 1, None), engine="vllm", async_steps=True), "algo.async.max_staleness",
     "the engines would share the training devices"),
    (Layout("cpu", 1, 2, megatron=(1, 1, None), engine="torch", async_steps=True), "algo.async.max_staleness",
     "cluster.rollout_nodes or cluster.rollout_devices_per_node"),
    (Layout("gpu", 1, 8, engine="vllm", async_steps=True), "algo.async.max_staleness",
     "with policy=hf on cuda the policy trains on GPU 0 of node 0"),
])
def test_impossible_layouts_name_the_key(layout, key, why):
    with pytest.raises(PlacementError, match=re.escape(why)) as e:
        make_plan(layout)
    assert e.value.key == key


def test_rollout_devices_per_node_splits_each_node():
    # 1 node x 2 GPUs: rank 0 on GPU 0, the engine on GPU 1
    plan = make_plan(Layout("gpu", 1, 2, megatron=(1, 1, None), engine="vllm", num_engines=None,
                            rollout_devices_per_node=1))
    assert plan.mode == "split-node" and plan.data_parallel_size == 1
    assert ranks(plan) == [(0, 0, 0, 0, 0, 0)] and engines(plan) == [(0, 0, (1,))]
    # 2 nodes x 8 GPUs, the last 2 of each generate: DP fills the 12 training GPUs, engines fill the rest
    plan = make_plan(Layout("gpu", 2, 8, megatron=(2, 1, None), engine="vllm", num_engines=None,
                            rollout_devices_per_node=2))
    assert plan.data_parallel_size == 6 and len(plan.ranks) == 12
    assert [(r.node, r.device) for r in plan.ranks] == [(n, d) for n in range(2) for d in range(6)]
    assert engines(plan) == [(0, 0, (6,)), (1, 0, (7,)), (2, 1, (6,)), (3, 1, (7,))]
    assert not {(r.node, r.device) for r in plan.ranks} & {(e.node, d) for e in plan.engines for d in e.devices}
    # engines of 2 GPUs tile the last 2 of each node; an explicit count takes the first sites
    plan = make_plan(Layout("gpu", 2, 8, megatron=(1, 1, None), engine="vllm", engine_tp=2, num_engines=1,
                            rollout_devices_per_node=2))
    assert engines(plan) == [(0, 0, (6, 7))] and plan.data_parallel_size == 12


def test_rollout_devices_per_node_from_the_config():
    # one CPU machine: the slots grow to hold the ranks and then the rollout slots; null fills those
    cfg, _ = load_config(["policy=megatron", "policy.megatron.tensor_parallel_size=2", "rollout=vllm",
                          "cluster.rollout_devices_per_node=2"])
    plan = plan_from_config(cfg)
    assert plan.layout.devices_per_node == 4 and plan.layout.rollout_devices_per_node == 2
    assert ranks(plan) == [(0, 0, 0, 0, 0, 0), (1, 0, 1, 1, 0, 0)]
    assert engines(plan) == [(0, 0, (2,)), (1, 0, (3,))]
    # the torch engine: an actor on its own slot (in the controller's process it would leave that slot idle)
    cfg, _ = load_config(["policy=megatron", "cluster.rollout_devices_per_node=1"])
    assert engines(plan_from_config(cfg)) == [(0, 0, (1,))]
    cfg, _ = load_config(["policy=megatron", "rollout=vllm", "cluster.device=cuda", "cluster.gpus_per_node=8",
                          "cluster.rollout_devices_per_node=2", "policy.megatron.data_parallel_size=null"])
    assert cfg.policy.megatron.data_parallel_size == 6 and len(plan_from_config(cfg).engines) == 2
    cfg, _ = load_config(["experiment=prorl_1p5b_async"])  # 4 x 8 GPUs, the last 4 of each node generate
    plan = plan_from_config(cfg)
    assert plan.mode == "split-node" and plan.layout.async_steps and cfg.policy.megatron.data_parallel_size == 16
    assert engines(plan) == [(i, i // 4, (4 + i % 4,)) for i in range(16)]
    with pytest.raises(ConfigError, match=r"cluster.rollout_devices_per_node=2: a split inside each node needs "
                                          r"policy=megatron"):
        load_config(["cluster.rollout_devices_per_node=2"])


def test_async_steps_make_a_single_torch_engine_an_actor():
    cfg, _ = load_config(["algo.async.max_staleness=1"])  # hf on CPU: the engine actor is a process of its own
    plan = plan_from_config(cfg)
    assert plan.layout.async_steps and engines(plan) == [(0, 0, (0,))] and plan.needs_ray
    assert not plan_from_config(load_config([])[0]).layout.async_steps
    assert make_plan(Layout("cpu", 1, 1, engine="torch")).engines == ()
    assert engines(make_plan(Layout("cpu", 1, 1, engine="torch", async_steps=True))) == [(0, 0, (0,))]


def test_async_steps_need_engines_on_devices_of_their_own():
    split = make_plan(Layout("gpu", 2, 8, rollout_nodes=1, megatron=(1, 1, None), engine="vllm", num_engines=None,
                             async_steps=True))
    assert split.mode == "split" and len(split.engines) == 8
    inside = make_plan(Layout("gpu", 1, 8, megatron=(1, 1, None), engine="torch", num_engines=None,
                              rollout_devices_per_node=2, async_steps=True))
    assert inside.mode == "split-node" and engines(inside) == [(0, 0, (6,)), (1, 0, (7,))]
    with pytest.raises(PlacementError) as e:
        make_plan(Layout("gpu", 1, 8, megatron=(1, 1, None), engine="vllm", num_engines=None, async_steps=True))
    assert e.value.key == "algo.async.max_staleness"
    assert "cluster.rollout_nodes" in str(e.value) and "cluster.rollout_devices_per_node" in str(e.value)


def test_async_colocated_megatron_is_a_config_error():
    with pytest.raises(ConfigError, match=r"algo.async.max_staleness=1: .*share the training devices"):
        load_config(["algo.async.max_staleness=1", "policy=megatron"])
    with pytest.raises(ConfigError, match=r"algo.async.max_staleness=2: .*policy=hf on cuda"):
        load_config(["algo.async.max_staleness=2", "cluster.device=cuda", "cluster.gpus_per_node=1"])
    cfg, _ = load_config(["algo.async.max_staleness=1", "policy=megatron", "cluster.rollout_devices_per_node=1"])
    assert plan_from_config(cfg).mode == "split-node"


def test_format_plan_shows_the_split_inside_each_node(capsys):
    plan = make_plan(Layout("gpu", 1, 4, megatron=(1, 1, None), engine="vllm", num_engines=None,
                            rollout_devices_per_node=1, async_steps=True))
    text = format_plan(plan)
    assert "cluster: 1 node(s) x 4 GPUs; split inside each node: the last 1 GPUs of each training node only " \
           "generate; asynchronous steps" in text
    assert "   0  gpu2    2 (0,0,2)                  -" in text and "   0  gpu3    -                          0" in text
    assert main(["plan", "policy=megatron", "rollout=vllm", "cluster.device=cuda", "cluster.gpus_per_node=8",
                 "cluster.rollout_devices_per_node=2", "algo.async.max_staleness=1",
                 "policy.megatron.data_parallel_size=null"]) == 0
    out = capsys.readouterr().out
    assert "the last 2 GPUs of each training node only generate" in out and "DP=6: 6 ranks" in out
    assert "rollout: 2 vllm engine(s) of 1 device(s)" in out


def test_config_errors_name_the_key_and_value():
    with pytest.raises(ConfigError, match=r"policy.megatron.tensor_parallel_size=16: TP=16 is larger than a node"):
        load_config(["experiment=prorl_1p5b", "policy.megatron.tensor_parallel_size=16"])
    with pytest.raises(ConfigError, match=r"cluster.cpu_slots_per_node=None: must be set for a CPU cluster"):
        load_config(["policy=megatron", "cluster.num_nodes=2"])
    with pytest.raises(ConfigError, match=r"rollout.num_engines=0: (must be >= 1, or null|0 engines of 1 device)"):
        load_config(["rollout=vllm", "rollout.num_engines=0"])
    with pytest.raises(ConfigError, match=r"rollout.num_engines=9: 9 engines of 1 device\(s\): 8 fit"):
        load_config(["experiment=prorl_1p5b", "cluster.num_nodes=1", "rollout.num_engines=9"])


def test_prorl_1p5b_fills_the_4x8_cluster_and_prorl_plan_prints_it(capsys):
    cfg, resolved = load_config(["experiment=prorl_1p5b"])
    assert cfg.policy.backend == "megatron" and cfg.policy.megatron.data_parallel_size == 32
    assert resolved.policy.megatron.data_parallel_size == 32  # the saved config has the resolved size
    assert main(["plan", "experiment=prorl_1p5b"]) == 0
    out = capsys.readouterr().out
    assert "policy: megatron, TP=1 PP=1 DP=32: 32 ranks" in out
    assert "rollout: 32 vllm engine(s) of 1 device(s)" in out  # rollout.num_engines=null: one per GPU
    assert "   3  gpu7    31 (0,0,31)" in out and "   0  gpu0    0 (0,0,0)                  0" in out
    assert main(["plan", "experiment=prorl_1p5b", "cluster.num_nodes=2"]) == 0
    assert "DP=16: 16 ranks" in capsys.readouterr().out
    assert main(["plan", "experiment=prorl_1p5b", "policy.megatron.pipeline_parallel_size=3"]) == 2
    assert "policy.megatron.data_parallel_size=None" in capsys.readouterr().err


def test_plans_the_engine_pool_would_refuse_are_named_before_anything_starts():
    """The pool and `prorl doctor` share this check: engines away from the hf policy's node are refused;
    engines over several devices are started (one actor, its vLLM workers on the plan's devices)."""
    from nemo_prorl.rollout.pool import plan_problems

    assert plan_problems(make_plan(Layout("gpu", 1, 2, engine="vllm", engine_tp=2))) == []
    assert plan_problems(make_plan(Layout("gpu", 2, 2, rollout_nodes=1, megatron=(1, 1, None), engine="vllm",
                                          num_engines=None))) == []
    assert plan_problems(make_plan(Layout("cpu", 1, 2, engine="vllm", engine_tp=2))) == []  # the CPU build splits


def test_the_moe_preset_resolves_to_its_published_settings_and_plans_ep_inside_nodes():
    """experiment=prorl_moe: NeMo-RL's Qwen3-30B-A3B layout on 4 x 8 GPUs (EP=8 per node, TP=1, vLLM engines
    of 2 GPUs) with ProRL v2.1's settings for MoE, and a plan whose EP groups never cross a node."""
    from nemo_prorl.cluster.plan import format_plan

    cfg, _ = load_config(["experiment=prorl_moe"])
    a, m = cfg.algo, cfg.policy.megatron
    assert (a.advantage_estimator, a.clip_eps_low, a.clip_eps_high) == ("reinforce_pp_baseline", 0.2, 0.27)
    assert a.num_prompts_per_minibatch == a.num_prompts_per_step == 64 and a.num_generations_per_prompt == 32
    rc = a.rollout_correction
    assert (rc.mode, rc.icepop_low, rc.icepop_high, rc.seq_geo_mask) == ("icepop", 0.5, 5.0, True)
    assert cfg.reward.stop_properly.enabled and cfg.reward.stop_properly.truncated_reward_scale == 0.0
    assert (m.tensor_parallel_size, m.expert_parallel_size, m.expert_tensor_parallel_size, m.data_parallel_size) == \
        (1, 8, 1, 32)
    assert cfg.rollout.routing_replay and cfg.rollout.vllm.tensor_parallel_size == 2
    plan = plan_from_config(cfg)
    assert len(plan.ranks) == 32 and len(plan.engines) == 16
    groups = {}
    for r in plan.ranks:
        groups.setdefault((r.node, r.edp), []).append(r.ep)
    assert all(sorted(eps) == list(range(8)) for eps in groups.values()) and len(groups) == 4  # one group a node
    assert "EP groups (ranks): [0,1,2,3,4,5,6,7]; [8,9,10,11,12,13,14,15]" in format_plan(plan)
