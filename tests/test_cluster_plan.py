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
])
def test_impossible_layouts_name_the_key(layout, key, why):
    with pytest.raises(PlacementError, match=re.escape(why)) as e:
        make_plan(layout)
    assert e.value.key == key


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
    """The pool and `prorl doctor` share this check: an engine over several GPUs is refused (by its key)."""
    from nemo_prorl.rollout.pool import plan_problems

    [(index, node, why)] = plan_problems(make_plan(Layout("gpu", 1, 2, engine="vllm", engine_tp=2)))
    assert (index, node) == (0, 0) and why.startswith("rollout.vllm.tensor_parallel_size=2:")
    assert plan_problems(make_plan(Layout("gpu", 2, 2, rollout_nodes=1, megatron=(1, 1, None), engine="vllm",
                                          num_engines=None))) == []
    assert plan_problems(make_plan(Layout("cpu", 1, 2, engine="vllm", engine_tp=2))) == []  # the CPU build splits
