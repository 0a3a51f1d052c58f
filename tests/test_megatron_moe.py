"""Expert parallelism in the Megatron backend (item 2 of issue 30): a tiny Qwen3-MoE trained one step by the
real Megatron worker over gloo (2 processes) under EP=2 with both token dispatchers and under TP=2 with
sequence parallelism and expert-TP 1 and 2 gives the EP=1 run's logprobs, loss, gradient norm, load-balancing
metrics and updated weights; the weights exported and synced node-locally hold every expert exactly once;
the distributed checkpoint restores an EP=2 run exactly; impossible or silently wrong layouts are refused
at launch naming the key. (PP=2 x EP=2 needs 4 ranks with the tp-cp-ep-pp-dp order, where EP x expert-TP
must equal TP: not run on this 2-rank budget; the plan checks for it are.)"""

import functools
import time

import megatron.core  # noqa: F401  a project dependency: fail, never skip, if it is missing
import pytest
import torch

from nemo_prorl.cluster.plan import Layout, PlacementError, check_experts, format_plan, make_plan

VOCAB, E, TOPK = 96, 4, 2
LR = 0.1
# name: policy.megatron overrides; "ep1" is the reference (TP=1, EP=1, DP=2)
LAYOUTS = {
    "ep2_alltoall": {"expert_parallel_size": 2, "moe_token_dispatcher_type": "alltoall"},
    "ep1": {},
    "tp2_sp_etp1": {"tensor_parallel_size": 2, "sequence_parallel": True, "expert_parallel_size": 2,
                    "expert_tensor_parallel_size": 1},
    # allgather gathers equal-shaped blocks: its EP group must stay inside the TP group (config check)
    "tp2_sp_etp1_allgather": {"tensor_parallel_size": 2, "sequence_parallel": True, "expert_parallel_size": 2,
                              "expert_tensor_parallel_size": 1, "moe_token_dispatcher_type": "allgather"},
    "tp2_sp_etp2": {"tensor_parallel_size": 2, "sequence_parallel": True, "expert_tensor_parallel_size": 2},
}
# DP=2 ranks with different numbers of micro-batches (2 and 1; then 1 and none): under EP=2 the expert group
# spans both, and each MoE layer's dispatch is a collective of it in every micro-batch
UNEVEN = {"uneven_ep2": {"expert_parallel_size": 2, "moe_token_dispatcher_type": "alltoall"}, "uneven_ep1": {}}
UNEVEN_ROWS = ([0, 1, 2], [0])  # row lengths 12, 8, 8 at 12 tokens a micro-batch: rank 0 packs [0], [1]
# a run that hangs fails after this long (the whole fixture takes well under a minute on an idle machine)
HANG_S = 600


# ---------------------------------------------------------------------------------------------- the plan
def _layout(tp=1, pp=1, dp=1, ep=1, etp=None, per=4):
    return Layout(kind="cpu", num_nodes=1, devices_per_node=per, megatron=(tp, pp, dp),
                  experts=(ep, tp if etp is None else etp))


def test_the_trap_layout_is_refused_naming_the_key():
    # TP=2 with expert-TP 1 and EP 1: the experts' gradients would never be summed over TP
    with pytest.raises(PlacementError, match="policy.megatron.expert_tensor_parallel_size") as e:
        make_plan(_layout(tp=2, etp=1))
    assert e.value.key == "policy.megatron.expert_tensor_parallel_size"
    make_plan(_layout(tp=2))  # expert-TP null resolves to TP: accepted
    make_plan(_layout(tp=2, ep=2, etp=1))  # expert-TP 1 with EP covering the TP group: accepted


def test_impossible_expert_layouts_are_refused_naming_the_key():
    with pytest.raises(PlacementError, match="policy.megatron.expert_parallel_size.*must divide TP x DP"):
        make_plan(_layout(dp=2, ep=4))
    with pytest.raises(PlacementError, match="policy.megatron.expert_parallel_size.*pipeline_parallel_size=2"):
        make_plan(_layout(pp=2, dp=2, ep=2))  # tp-cp-ep-pp-dp: with PP > 1, EP x expert-TP must equal TP
    make_plan(_layout(tp=2, pp=2, ep=2, etp=1))
    # expert-TP above TP without EP: megatron all-reduces the experts over the dense DP group, which holds
    # different expert-TP shards (their gradients would be added together)
    with pytest.raises(PlacementError, match="policy.megatron.expert_tensor_parallel_size.*expert-TP=2 above") as e:
        make_plan(_layout(dp=2, etp=2))
    assert e.value.key == "policy.megatron.expert_tensor_parallel_size"
    with pytest.raises(PlacementError, match="policy.megatron.expert_parallel_size.*6 experts"):
        check_experts(6, 32, 4, 1)
    with pytest.raises(PlacementError, match="policy.megatron.expert_tensor_parallel_size"):
        check_experts(8, 30, 2, 4)
    with pytest.raises(PlacementError, match="no experts"):
        check_experts(0, 0, 2, 1)


def test_plan_shows_the_expert_groups_in_megatrons_order():
    plan = make_plan(_layout(tp=2, dp=4, ep=4, etp=1, per=8))
    # expert-TP 1, EP fastest: EP groups are consecutive ranks, expert-DP the rest
    assert [(r.ep, r.etp, r.edp) for r in plan.ranks[:5]] == [(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0), (0, 0, 1)]
    text = format_plan(plan)
    assert "experts: EP=4 expert-TP=1 expert-DP=2; EP groups (ranks): [0,1,2,3]; [4,5,6,7]" in text
    assert "experts:" not in format_plan(make_plan(_layout(tp=2)))  # dense layout: nothing to show


def test_config_checks_name_the_moe_keys():
    from nemo_prorl.config.loader import ConfigError, load_config

    for override, key in (("moe_token_dispatcher_type=flex", "moe_token_dispatcher_type"),
                          ("moe_aux_loss_coeff=-1", "moe_aux_loss_coeff"), ("moe_z_loss_coeff=-0.1", "moe_z_loss_coeff"),
                          ("expert_parallel_size=0", "expert_parallel_size"),
                          ("expert_tensor_parallel_size=0", "expert_tensor_parallel_size"),
                          # EP=2 over DP ranks, whose micro-batches differ in shape: allgather would hang
                          ("moe_token_dispatcher_type=allgather expert_parallel_size=2 data_parallel_size=2",
                           "moe_token_dispatcher_type")):
        with pytest.raises(ConfigError, match=f"policy.megatron.{key}"):
            load_config(["policy=megatron", *[f"policy.megatron.{o}" for o in override.split()]])


def test_launch_checks_the_moe_keys_against_the_models_shape(tmp_path, caplog):
    """What megatron refuses only once the model is built or trains (after a rollout), and what it would
    silently ignore, is refused by load_config naming the key: the model's shape comes from model.tiny or a
    model folder's config.json."""
    import json
    import logging

    from nemo_prorl.config.loader import ConfigError, load_config

    moe = ["policy=megatron", "model.tiny.architecture=qwen3_moe"]

    def refused(overrides: list[str], message: str) -> None:
        with pytest.raises(ConfigError) as e:
            load_config(overrides)
        assert message in str(e.value), str(e.value)

    # MoE with TP > 1 needs sequence parallelism (megatron's MoE layer refuses to train without it)
    refused([*moe, "policy.megatron.tensor_parallel_size=2"], "policy.megatron.sequence_parallel=False: model.tiny.architecture='qwen3_moe' is a mixture")
    load_config([*moe, "policy.megatron.tensor_parallel_size=2", "policy.megatron.sequence_parallel=true"])
    folder = tmp_path / "moe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_experts": 4}))
    refused(["policy=megatron", f"model.path={folder}", "policy.megatron.tensor_parallel_size=2"],
            "config.json (model_type 'qwen3_moe') is a mixture-of-experts model: with tensor_parallel_size=2")
    # allgather refuses the varying micro-batch shapes of PP > 1 (not with the interleaved schedule)
    refused([*moe, "policy.megatron.moe_token_dispatcher_type=allgather", "policy.megatron.pipeline_parallel_size=2"],
            "policy.megatron.moe_token_dispatcher_type='allgather': allgather does not take micro-batches")
    load_config([*moe, "policy.megatron.moe_token_dispatcher_type=allgather", "policy.megatron.pipeline_parallel_size=2",
                 "policy.megatron.virtual_pipeline_parallel_size=2"])
    # a dense model has no experts to split: with the megatron backend, and with hf (which never splits them)
    refused(["policy=megatron", "policy.megatron.expert_parallel_size=2", "policy.megatron.data_parallel_size=2"],
            "policy.megatron.expert_parallel_size=2: model.tiny.architecture='qwen2' is a dense model")
    refused(["policy=megatron", "policy.megatron.expert_tensor_parallel_size=1"],
            "policy.megatron.expert_tensor_parallel_size=1: model.tiny.architecture='qwen2' is a dense model")
    refused(["model.tiny.architecture=qwen3_moe", "policy.megatron.expert_parallel_size=2"],
            "policy.megatron.expert_parallel_size=2: expert parallelism is the megatron backend's")
    # an aux-loss coefficient with no load-balancing loss to scale: a warning naming both keys
    with caplog.at_level(logging.WARNING, logger="nemo_prorl"):
        load_config([*moe, "policy.megatron.moe_router_load_balancing_type=none"])
        load_config([*moe, "policy.megatron.moe_router_load_balancing_type=none", "policy.megatron.moe_aux_loss_coeff=0"])
    warned = [r.getMessage() for r in caplog.records if "moe_aux_loss_coeff" in r.getMessage()]
    assert len(warned) == 1 and "moe_router_load_balancing_type=none" in warned[0], warned


# ---------------------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Qwen3-MoE as transformers saves it, with random norms and a sharp router."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         num_experts=E, num_experts_per_tok=TOPK, moe_intermediate_size=32, norm_topk_prob=True,
                         tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif "gate.weight" in n:
                p.mul_(5)
    path = tmp_path_factory.mktemp("qwen3moe")
    model.save_pretrained(path)
    return path


def _batch() -> dict:
    """6 rows (prompt left-padded to P, response right-padded to R) of even total lengths 8-12: with
    micro_batch_tokens=12 every micro-batch is one row, whatever the DP split, and sequence parallelism's
    rounding to a multiple of TP=2 adds no padding, so all layouts see the same micro-batches."""
    g = torch.Generator().manual_seed(1)
    P, R = 6, 6
    plen, rlen = [6, 3, 4, 2, 5, 6], [6, 5, 4, 6, 5, 4]
    ids = torch.randint(1, VOCAB, (6, P + R), generator=g)
    attn = torch.zeros(6, P + R, dtype=torch.long)
    resp = torch.zeros(6, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(plen, rlen)):
        attn[i, P - p : P + r] = 1
        resp[i, :r] = 1
    return {"input_ids": ids * attn, "attention_mask": attn, "response_mask": resp,
            "advantages": torch.linspace(-1, 1, 6)}


def _loss(logp, ent, extras, *, total):
    """A policy-gradient loss over the mini-batch's response tokens (normalised by their global count)."""
    mask = extras["response_mask"].float()
    loss = -(logp * extras["advantages"].unsqueeze(1) * mask).sum() / total
    return loss, {"loss": float(loss.detach())}


def _gather_export(worker):
    """Every rank's export_shards, assembled on all ranks into the full HF state dict."""
    import torch.distributed as dist

    from nemo_prorl.policy.megatron_convert import megatron_to_hf
    from nemo_prorl.policy.megatron_moe import assemble

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, worker.export_shards())
    items = {k: v for p in parts for k, v in p.items()}
    stages, experts = assemble(items, *worker.shard_grid(), True)
    return megatron_to_hf(stages, worker.shape, experts), items


def _node_local_sync(worker):
    """The node-local weight sync's rank side on one CPU node: rank 0 leads, receives the shards it lacks
    (under EP=2 the other rank's experts) and plans the HF buckets; their weights, materialised."""
    import torch.distributed as dist

    from nemo_prorl.weight_sync.sync import transfer_plan

    metas = [None] * dist.get_world_size()
    dist.all_gather_object(metas, worker.sync_meta())
    held = [list(m) for m in metas]
    leaders, transfers = transfer_plan(held, [(0, 0), (0, 1)], [(0, -1)])
    kinds = {r: {"host"} for r in leaders.values()}
    worker.sync_prepare(transfers, kinds, 1 << 20, "", {k: v for m in metas for k, v in m.items()})
    sender = worker._sender()
    out = {w.name: w.materialize(torch.empty(w.shape, dtype=w.dtype)) for b in sender.buckets for w in b}
    worker.sync_end()
    return out, held, transfers


def _checkpoint_round_trip(worker, batch, loss, path) -> dict:
    """Save after the first step, take a second, load: the state is the saved one exactly, and the second
    step taken again gives the same result."""
    worker.save_state(path)
    saved = worker.state_dict()
    second = worker.train_minibatch(batch, loss, 1.0, LR)
    worker.load_state(path)
    restored = worker.state_dict()
    again = worker.train_minibatch(batch, loss, 1.0, LR)
    refused = []  # the in-memory state of another expert layout, or from before EP (EP=1), is refused
    for bad in (dict(saved, experts=(1, 1)), {k: v for k, v in saved.items() if k != "experts"}):
        try:
            worker.load_state_dict(bad)
        except RuntimeError as e:
            refused.append(str(e))
    return {"saved": saved, "restored": restored, "second": second, "again": again, "refused": refused}


def _rank(rank: int, world: int, model_dir: str, tmp: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_prorl.config.schema import MegatronConfig, OptimConfig
    from nemo_prorl.policy.megatron_worker import MegatronWorker, WorkerSpec

    batch = _batch()
    loss = functools.partial(_loss, total=float(batch["response_mask"].sum()))
    import os
    only = os.environ.get("MOE_ONLY")
    for name, overrides in LAYOUTS.items():
        if only and name != only:
            continue
        m = MegatronConfig(micro_batch_tokens=12, logprob_micro_batch_tokens=12, data_parallel_size=None,
                           moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, transformer_impl="local", **overrides)
        # Adam with eps=1 moves each weight by about lr x its gradient: the weights compare the gradients
        spec = WorkerSpec(rank=rank, world_size=world, model_dir=model_dir, megatron=m,
                          optim=OptimConfig(lr=LR, eps=1.0, weight_decay=0.0, grad_clip=1e9), dtype="float32", seed=0,
                          use_reference=False, num_threads=1)
        worker = MegatronWorker(spec, dist.FileStore(f"{tmp}/store-{name}", world))
        # this rank's data-parallel replica's rows, as MegatronPolicy splits them
        dp = world // (m.tensor_parallel_size * m.pipeline_parallel_size)
        rows = torch.arange(6).tensor_split(dp)[worker.dp_rank]
        mine = {k: v[rows] for k, v in batch.items()}
        result = {"rows": rows, "logp": worker.logprobs(mine, 1.0, False),
                  "metrics": worker.train_minibatch(mine, loss, 1.0, LR)}
        result["weights"], items = _gather_export(worker)
        result["exported_keys"] = sorted(items)
        if name == "ep2_alltoall":
            result["synced"], result["held"], result["transfers"] = _node_local_sync(worker)
            result["ckpt"] = _checkpoint_round_trip(worker, mine, loss, f"{tmp}/ckpt")
        torch.save(result, f"{tmp}/{name}-rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
        parallel_state.destroy_model_parallel()
    for name, overrides in UNEVEN.items():
        if only and name != only:
            continue
        m = MegatronConfig(micro_batch_tokens=12, logprob_micro_batch_tokens=12, data_parallel_size=None,
                           moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, transformer_impl="local", **overrides)
        spec = WorkerSpec(rank=rank, world_size=world, model_dir=model_dir, megatron=m,
                          optim=OptimConfig(lr=LR, eps=1.0, weight_decay=0.0, grad_clip=1e9), dtype="float32", seed=0,
                          use_reference=False, num_threads=1)
        worker = MegatronWorker(spec, dist.FileStore(f"{tmp}/store-{name}", world))
        result = []
        for keep in UNEVEN_ROWS:
            sub = {k: v[keep] for k, v in batch.items()}
            rows = torch.arange(len(keep)).tensor_split(2)[worker.dp_rank]
            mine = {k: v[rows] for k, v in sub.items()}
            step_loss = functools.partial(_loss, total=float(sub["response_mask"].sum()))
            result.append({"rows": rows, "num_mbs": len(worker._split(mine, m.micro_batch_tokens)),
                           "own_mbs": len(worker_split_alone(mine, m)), "logp": worker.logprobs(mine, 1.0, False),
                           "metrics": worker.train_minibatch(mine, step_loss, 1.0, LR)})
        torch.save(result, f"{tmp}/{name}-rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
        parallel_state.destroy_model_parallel()


def worker_split_alone(batch, m):
    """The micro-batches a rank packs from its own rows, before the ranks agree on a count."""
    from nemo_prorl.policy.microbatch import split_micro_batches

    return split_micro_batches(batch, m.micro_batch_tokens, pad_token_id=0)


@pytest.fixture(scope="module")
def runs(moe_dir, tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("moe-runs")
    (tmp / "ckpt").mkdir()  # (MegatronPolicy.save_state makes it before the ranks write)
    ctx = mp.spawn(_rank, args=(2, str(moe_dir), str(tmp)), nprocs=2, join=False)
    deadline = time.monotonic() + HANG_S
    while not ctx.join(timeout=5):  # (raises if a rank failed)
        if time.monotonic() > deadline:  # ranks stuck in mismatched collectives: fail instead of hanging
            import psutil

            for p in ctx.processes:  # each rank and the helper processes it started
                for proc in [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]:
                    proc.kill()
            pytest.fail(f"the two Megatron ranks did not finish in {HANG_S} s (a collective hang?)")
    return {name: [torch.load(tmp / f"{name}-rank{r}.pt", weights_only=False) for r in range(2)]
            for name in (*LAYOUTS, *UNEVEN)}


def _output(rank_results):
    """The logprobs and loss come from TP rank 0 of the last stage of each DP replica: rank 0 alone (TP=2)
    or both (DP=2, each its own rows)."""
    logp = torch.full((6, 6), float("nan"))
    for r in rank_results:
        if r["logp"] is not None:
            logp[r["rows"]] = r["logp"]
    return logp, sum(r["metrics"].get("loss", 0.0) for r in rank_results)


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "ep1"])
def test_expert_parallel_layouts_match_ep1(runs, moe_dir, layout):
    from safetensors.torch import load_file

    ref, got = runs["ep1"], runs[layout]
    ref_logp, ref_loss = _output(ref)
    logp, loss = _output(got)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    m, mr = got[0]["metrics"], ref[0]["metrics"]
    assert m["update_skipped"] == 0.0
    assert m["grad_norm"] == pytest.approx(mr["grad_norm"], rel=1e-5)
    # the load-balancing metrics are reduced over all ranks: the same on each, and the same as EP=1's
    for key in ("moe_aux_loss", "moe_z_loss", "moe_load_imbalance", "moe_load_imbalance_max"):
        assert got[1]["metrics"][key] == m[key], key
        assert m[key] == pytest.approx(mr[key], rel=1e-5), key
    assert 1.0 <= m["moe_load_imbalance"] <= m["moe_load_imbalance_max"] <= E / TOPK
    # every rank exported the same full model, each expert exactly once, equal to EP=1's after the step
    before = load_file(moe_dir / "model.safetensors")
    w, wr = got[0]["weights"], ref[0]["weights"]
    assert set(w) == set(wr) == set(before)
    moved = max((w[k] - wr[k]).abs().max().item() for k in w)
    step = max((w[k] - before[k]).abs().max().item() for k in w)
    experts_step = max((w[k] - before[k]).abs().max().item() for k in w if ".experts." in k)
    assert step > 1e-3 and experts_step > 1e-4 and moved < 2e-6, (step, experts_step, moved)


def test_uneven_micro_batch_counts_under_ep_complete_and_match_ep1(runs):
    """Rank 0 packs 2 micro-batches and rank 1 one (then 1 and none): the ranks agree on the largest count,
    the other running empty ones, so the EP=2 step completes (before, rank 0's second dispatch waited forever
    for rank 1) and gives EP=1's logprobs, loss, gradient norm and load-balancing metrics."""
    ep2, ep1 = runs["uneven_ep2"], runs["uneven_ep1"]
    for step, keep in enumerate(UNEVEN_ROWS):
        assert [r[step]["own_mbs"] for r in ep2] == ([2, 1] if len(keep) == 3 else [1, 0])
        assert [r[step]["num_mbs"] for r in ep2] == [r[step]["num_mbs"] for r in ep1] == [len(keep) // 2 + 1] * 2
        for got, ref in zip(ep2, ep1):
            g, f = got[step], ref[step]
            assert torch.equal(g["rows"], f["rows"])
            if f["logp"] is None:
                assert g["logp"] is None
            else:
                torch.testing.assert_close(g["logp"], f["logp"], atol=1e-5, rtol=0)
            for key in ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "moe_load_imbalance"):
                assert g["metrics"].get(key, 0.0) == pytest.approx(f["metrics"].get(key, 0.0), rel=1e-5, abs=1e-7), key
            assert g["metrics"]["update_skipped"] == 0.0


def test_resume_layout_check_covers_the_expert_layout():
    from nemo_prorl.policy.megatron import check_resume_layout

    layout = [(0, 0, 0), (0, 0, 1)]
    check_resume_layout({"layout": layout, "experts": (2, 1)}, layout, (2, 1), tp=1)
    check_resume_layout({"layout": layout}, layout, (1, 1), tp=1)  # saved before EP: EP=1, expert-TP = TP
    for state, experts in (({"layout": layout, "experts": (1, 1)}, (2, 1)), ({"layout": layout}, (2, 1)),
                           ({"layout": layout, "experts": (2, 2)}, (2, 1)),
                           ({"layout": [(0, 0, 0), (1, 0, 0)], "experts": (2, 1)}, (2, 1))):
        with pytest.raises(ValueError, match="resume with the same policy.megatron parallel sizes"):
            check_resume_layout(state, layout, experts, tp=1)


def test_ep2_shards_hold_each_expert_once_and_sync_node_locally(runs):
    r0, r1 = runs["ep2_alltoall"]
    # rank r holds experts [2r, 2r + 2): its expert shard (stage 0, EXPERTS, ep=r, etp=0); both hold the dense one
    assert r0["held"] == [[(0, 0), (0, -1, 0, 0)], [(0, 0), (0, -1, 1, 0)]]
    # the dense shard is exported by DP rank 0 only, each expert shard by its expert-DP rank 0
    assert r0["exported_keys"] == [(0, -1, 0, 0), (0, -1, 1, 0), (0, 0)]
    # the leader (rank 0) receives only the experts it lacks
    assert r0["transfers"] == [(1, 0, (0, -1, 1, 0))]
    synced = r0["synced"]
    assert set(synced) == set(r0["weights"]) and all(torch.equal(synced[k], r0["weights"][k]) for k in synced)


def test_ep2_distributed_checkpoint_round_trip_is_exact(runs):
    from tests.checks import _flat

    for r in runs["ep2_alltoall"]:
        c = r["ckpt"]
        saved, restored = _flat(c["saved"]), _flat(c["restored"])
        # the loader also puts Adam's step count into the parameter groups (MegatronWorker._restore_adam_steps)
        extra = set(restored) - set(saved)
        assert set(saved) <= set(restored) and all(".param_groups." in k and k.endswith(".step.") for k in extra)
        assert {float(restored[k]) for k in extra} == {1.0}
        for k, v in saved.items():
            assert (torch.equal(v, restored[k]) if torch.is_tensor(v) else v == restored[k]), k
        # the second step taken again from the restored state is the same step
        assert c["again"]["grad_norm"] == c["second"]["grad_norm"]
        assert c["again"]["moe_aux_loss"] == c["second"]["moe_aux_loss"]
        assert c["saved"]["experts"] == (2, 1)
        assert len(c["refused"]) == 2 and all("policy.megatron parallel sizes" in e for e in c["refused"])
