"""Routing replay in the Megatron backend (policy/megatron_replay.py): the batch's routed_experts carried
through micro-batching, mapped to each router's targets in Megatron's token order (sequence-first, the
sequence-parallel shard of each TP rank, each pipeline stage's own layers); then real megatron-core over
gloo: forced routing is followed exactly, replay survives recomputation in backward (with 1F1B pipelining)
and gives the router gradient, and the logprobs under a replayed routing equal transformers' with the same
routing forced."""

import types

import pytest
import torch

from nemo_prorl.policy.megatron_replay import micro_batch_targets, moe_layer_numbers
from nemo_prorl.policy.microbatch import empty_micro_batch, filler_routing, pad_micro_batch, split_micro_batches

L, K = 3, 2


def _batch():
    """3 rows, prompts left-padded to P=4, responses right-padded to R=3. Every input id is unique
    (row * 16 + position), and the routing of a position encodes its input id, so a re-laid-out routing
    can be checked against the re-laid-out tokens."""
    P, R = 4, 3
    plen, rlen = [4, 2, 3], [3, 1, 2]
    ids = torch.arange(3 * (P + R)).view(3, P + R) // (P + R) * 16 + torch.arange(P + R)
    attn = torch.zeros(3, P + R, dtype=torch.long)
    resp = torch.zeros(3, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(plen, rlen)):
        attn[i, P - p : P + r] = 1
        resp[i, :r] = 1
    routed = _code(ids)
    routed[attn == 0] = filler_routing(3, P + R, L, K, 400)[attn == 0]  # the contract's filler
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "routed_experts": routed,
            "advantages": torch.ones(3, R)}


def _code(ids: torch.Tensor) -> torch.Tensor:
    """A routing that names its token: expert ids*8 + layer*2 + slot (int16 [*, L, K])."""
    return (ids[..., None, None] * 8 + torch.arange(L)[:, None] * 2 + torch.arange(K)).to(torch.int16)


def test_filler_routing_spreads_padding_over_all_experts():
    """Positions without a recorded routing take k distinct experts each, and all experts equally often
    over the positions: experts 0..k-1 everywhere would put every padding token on the first EP rank."""
    f = filler_routing(3, 5, L, K, num_experts=6)
    assert f.shape == (3, 5, L, K) and f.dtype == torch.int16
    assert torch.equal(f[:, :, 0], f[:, :, 1])  # the same spread in every layer
    flat = f[:, :, 0].reshape(-1, K)
    assert all(len(set(p.tolist())) == K for p in flat)
    assert torch.bincount(flat.flatten().long(), minlength=6).tolist() == [5] * 6  # 15 positions x 2 / 6
    with pytest.raises(ValueError, match="top-2 routing over 1 experts"):
        filler_routing(1, 1, 1, 2, num_experts=1)


def test_micro_batches_carry_the_routing_of_their_tokens():
    batch = _batch()
    NE = 64  # the model's experts (the codes name up to 8 * 38 + 5): the filler spreads over them
    mbs = split_micro_batches(batch, max_tokens=14, pad_token_id=0, pad_multiple=2, num_experts=400)
    assert len(mbs) >= 2 and sorted(int(r) for mb in mbs for r in mb.rows) == [0, 1, 2]
    for mb in mbs:
        assert "routed_experts" not in mb.extras  # a model input, not a loss input
        b, S = mb.tokens.shape
        assert mb.routed_experts.shape == (b, S, L, K) and mb.routed_experts.dtype == torch.int16
        filler = filler_routing(b, S, L, K, 400)
        for j, row in enumerate(mb.rows.tolist()):
            n = int(batch["attention_mask"][row].sum())
            assert torch.equal(mb.routed_experts[j, :n], _code(mb.tokens[j, :n]))
            assert torch.equal(mb.routed_experts[j, n:], filler[j, n:])
    # fixed-shape padding (interleaved schedule) and a rank's empty micro-batch: filler routing
    big = pad_micro_batch(mbs[0], rows=4, width=10, num_experts=NE)
    b, S = mbs[0].tokens.shape
    filler = filler_routing(4, 10, L, K, NE)
    assert big.routed_experts.shape == (4, 10, L, K)
    assert torch.equal(big.routed_experts[:b, :S], mbs[0].routed_experts)
    assert torch.equal(big.routed_experts[b:], filler[b:]) and torch.equal(big.routed_experts[:, S:], filler[:, S:])
    empty = empty_micro_batch(batch, pad_token_id=0, pad_multiple=2, num_experts=NE)
    assert torch.equal(empty.routed_experts, filler_routing(1, 2, L, K, NE))
    # without the model's count, the spread covers the experts the routing names
    assert torch.equal(empty_micro_batch(batch, pad_token_id=0).routed_experts,
                       filler_routing(1, 2, L, K, int(batch["routed_experts"].max()) + 1))
    # a batch without routing gives micro-batches without it
    plain = {k: v for k, v in batch.items() if k != "routed_experts"}
    assert all(mb.routed_experts is None for mb in split_micro_batches(plain, 14, pad_token_id=0))


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (4, True)])
def test_targets_follow_megatrons_token_order(tp, sp):
    """Row n of a layer's targets is the routing of the token that Megatron's router sees as its row n: the
    [b, S] tokens embedded to [S, b, h] (sequence-first), split over the TP ranks along the sequence with
    sequence parallelism, flattened to [S * b (/ TP), h]."""
    b, S = 3, 8
    tokens = torch.arange(b * S).view(b, S)
    routed = _code(tokens)
    seen = tokens.t()  # what the embedding hands the decoder, [S, b]
    parts = []
    for rank in range(tp):
        shard = seen.chunk(tp, dim=0)[rank] if sp else seen
        t = micro_batch_targets(routed, tp_rank=rank, tp=tp, sequence_parallel=sp)
        assert t.dtype == torch.long and t.shape == (L, shard.numel(), K) and t.is_contiguous()
        expected = _code(shard.reshape(-1)).permute(1, 0, 2)  # the router flattens [S, b, h] -> [S * b, h]
        assert torch.equal(t, expected.long())
        parts.append(t)
    if sp:  # the shards are the whole sequence, once
        assert torch.equal(torch.cat(parts, dim=1), micro_batch_targets(routed))
    with pytest.raises(ValueError, match="sequence-parallel"):
        micro_batch_targets(routed[:, :7], tp_rank=0, tp=2, sequence_parallel=True)


def test_moe_layer_numbers():
    cfg = types.SimpleNamespace(num_moe_experts=4, num_layers=4, moe_layer_freq=1)
    assert moe_layer_numbers(cfg) == [1, 2, 3, 4]
    assert moe_layer_numbers(types.SimpleNamespace(num_moe_experts=4, num_layers=4, moe_layer_freq=2)) == [1, 3]
    listed = types.SimpleNamespace(num_moe_experts=4, num_layers=4, moe_layer_freq=[0, 1, 1, 0])
    assert moe_layer_numbers(listed) == [2, 3]
    assert moe_layer_numbers(types.SimpleNamespace(num_moe_experts=None, num_layers=4, moe_layer_freq=1)) == []


# ---------------------------------------------------------------------------------------------- real megatron-core
VOCAB, E, TOPK, NL = 96, 4, 2, 4


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Qwen3-MoE saved as transformers writes it (the Megatron worker converts it), with random norms
    so that a wrong QK-norm or layer layout cannot pass."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=NL,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         num_experts=E, num_experts_per_tok=TOPK, moe_intermediate_size=32, norm_topk_prob=True,
                         tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif "gate.weight" in n:  # sharp router logits: a routing the model would not choose is far off it
                p.mul_(20)
    path = tmp_path_factory.mktemp("qwen3moe")
    model.save_pretrained(path)
    return path


def _replay_batch(seed: int = 1) -> dict:
    """4 rows in the trainer layout (prompt left-padded to P, response right-padded to R) with a random
    routing of k distinct experts for every real position (filler elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    P, R = 5, 4
    plen, rlen = [5, 3, 4, 2], [4, 2, 3, 4]
    ids = torch.randint(1, VOCAB, (4, P + R), generator=g)
    attn = torch.zeros(4, P + R, dtype=torch.long)
    resp = torch.zeros(4, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(plen, rlen)):
        attn[i, P - p : P + r] = 1
        resp[i, :r] = 1
    ids = ids * attn
    routed = torch.rand(4, P + R, NL, E, generator=g).argsort(dim=-1)[..., :TOPK].to(torch.int16)
    routed[attn == 0] = filler_routing(4, P + R, NL, TOPK, E)[attn == 0]
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp, "routed_experts": routed}


def _sum_loss(logp, ent, extras):
    """A loss with a gradient everywhere the response is: minus the sum of its log-probabilities / 8."""
    return -logp.sum() / 8, {}


def _replay_rank(rank: int, world: int, tp: int, pp: int, vp, model_dir: str, store_path: str, out_dir: str) -> None:
    """One rank of a Megatron worker (full recompute, small micro-batches) that runs the batch's logprobs and
    a training step under replay, recording every routing its routers produce."""
    from megatron.core.transformer.moe.router import TopKRouter

    from nemo_prorl.config.schema import MegatronConfig, OptimConfig
    from nemo_prorl.policy.megatron_replay import micro_batch_targets
    from nemo_prorl.policy.megatron_worker import MegatronWorker, WorkerSpec

    m = MegatronConfig(tensor_parallel_size=tp, sequence_parallel=tp > 1, pipeline_parallel_size=pp,
                       virtual_pipeline_parallel_size=vp, recompute_granularity="full", recompute_method="uniform",
                       # 3 micro-batches of the 4 rows (the interleaved schedule adds an empty 4th: a multiple of PP)
                       recompute_num_layers=1, micro_batch_tokens=16, logprob_micro_batch_tokens=16,
                       moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none")
    spec = WorkerSpec(rank=rank, world_size=world, model_dir=model_dir, megatron=m,
                      optim=OptimConfig(lr=0.0, grad_clip=1e9), dtype="float32", seed=0, use_reference=True,
                      num_threads=1)
    worker = MegatronWorker(spec, torch.distributed.FileStore(store_path, world))
    seen: list = []
    for c in worker.model:
        for mod in worker._module(c).modules():
            if isinstance(mod, TopKRouter):
                mod.register_forward_hook(lambda mod, a, out: seen.append((mod.layer_number, out[1].clone())))
    batch = _replay_batch()
    logp = worker.logprobs(batch, 1.0, False)
    fwd = list(seen)
    ref_logp = worker.logprobs(batch, 1.0, True)  # the reference model's routers replay too
    own_logp = worker.logprobs({k: v for k, v in batch.items() if k != "routed_experts"}, 1.0, False)
    seen.clear()
    stats = worker.train_minibatch(batch, _sum_loss, 1.0, 0.0)
    mbs = worker._split(batch, m.micro_batch_tokens)
    shard = dict(tp_rank=worker.tp_rank, tp=tp, sequence_parallel=m.sequence_parallel)  # this rank's positions
    targets = [micro_batch_targets(mb.routed_experts, **shard)
               for mb in worker._split(batch, m.logprob_micro_batch_tokens)]
    grads = {}
    for c in worker.model:
        for layer in worker._module(c).decoder.layers:
            grads[layer.layer_number - 1] = layer.mlp.router.weight.main_grad.clone()
    torch.save({"logp": logp, "ref_logp": ref_logp, "own_logp": own_logp, "fwd": fwd, "train": list(seen),
                "targets": targets, "grad_norm": stats["grad_norm"], "router_grads": grads, "num_train_mbs": len(mbs),
                "train_targets": [micro_batch_targets(mb.routed_experts, **shard) for mb in mbs]},
               f"{out_dir}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _run_ranks(world: int, tp: int, pp: int, vp, model_dir, tmp_path) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_replay_rank, args=(world, tp, pp, vp, str(model_dir), str(tmp_path / "store"), str(tmp_path)),
             nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _followed(seen: list, targets: list) -> list[int]:
    """For each routing a router produced, the micro-batch whose replayed routing it is exactly (its
    routing map holds that micro-batch's target experts for that layer, and no others)."""
    which = []
    for layer_number, routing_map in seen:
        hits = [i for i, t in enumerate(targets) if t.shape[1] == routing_map.shape[0] and torch.equal(
            routing_map, torch.zeros_like(routing_map).scatter(1, t[layer_number - 1], True))]
        assert hits, f"layer {layer_number} did not follow any micro-batch's replayed routing"
        which.append(hits[0])
    return which


def _hf_reference(model_dir, batch):
    """transformers' log-probabilities [B, R] of the batch's responses with its routing forced (H3's hook),
    and the gradients of _sum_loss: router weights per layer and the total norm."""
    from transformers import AutoModelForCausalLM

    from nemo_prorl.policy.routing import MoERouting

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hooks = MoERouting(hf)
    P = batch["input_ids"].shape[1] - batch["response_mask"].shape[1]
    out, own = torch.zeros(batch["response_mask"].shape), torch.zeros(batch["response_mask"].shape)
    total = 0
    for i in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][i].bool()
        ids, routed = batch["input_ids"][i][keep], batch["routed_experts"][i][keep]
        p = int(keep[:P].sum())

        def response_logp(logits):
            return torch.log_softmax(logits[0].float(), -1)[:-1].gather(-1, ids[1:, None])[:, 0][p - 1 :]

        with hooks.forcing(routed[None]):
            lp = response_logp(hf(ids[None]).logits)
        out[i, : lp.shape[0]] = lp.detach()
        with torch.no_grad():
            own[i, : lp.shape[0]] = response_logp(hf(ids[None]).logits)
        total = total + lp.sum()
    (-total / 8).backward()
    grads = {i: layer.mlp.gate.weight.grad for i, layer in enumerate(hf.model.layers)}
    norm = torch.sqrt(sum((q.grad.double() ** 2).sum() for q in hf.parameters() if q.grad is not None))
    hooks.remove()
    return out, own, grads, float(norm)


@pytest.mark.parametrize("tp,pp,vp", [(1, 1, None), (1, 2, None), (1, 2, 2), (2, 1, None)],
                         ids=["one-rank", "pp2", "pp2-vp2", "tp2-sp"])
def test_replay_follows_the_routing_through_recompute_and_matches_transformers(tp, pp, vp, moe_dir, tmp_path):
    """Logprobs and one training step with full recompute under replay of a random routing (far from the
    model's own choices): every router call, in the forward and in the recomputation in backward, took
    exactly its micro-batch's routing; logprobs and router gradients equal transformers' with that routing
    forced; the reference model replays too, and a batch without routing routes anew afterwards. With PP=2
    (1F1B, and interleaved over 2 x 2 stages) a stage runs its second forward before its first backward, so
    a recomputation that replayed the latest targets instead of its own micro-batch's would be caught, and
    each stage's routers take their own layers' routing. With TP=2 and sequence parallelism each rank's
    routers see (and replay) their half of the positions."""
    ranks = _run_ranks(tp * pp, tp, pp, vp, moe_dir, tmp_path)
    batch = _replay_batch()
    ref_logp, own_logp, ref_grads, ref_norm = _hf_reference(moe_dir, batch)
    last = next(r for r in ranks if r["logp"] is not None)  # the last stage's first TP rank
    # the replayed routing matters: the model's own routing gives other logprobs (in both implementations)
    assert (ref_logp - own_logp).abs().max() > 1e-3
    torch.testing.assert_close(last["own_logp"], own_logp, atol=2e-5, rtol=1e-5)
    for key in ("logp", "ref_logp"):
        torch.testing.assert_close(last[key], ref_logp * batch["response_mask"], atol=2e-5, rtol=1e-5)
    assert last["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    for r in ranks:
        for layer, g in r["router_grads"].items():
            assert g.abs().sum() > 0  # the router trains under replay
            torch.testing.assert_close(g, ref_grads[layer], atol=1e-5, rtol=1e-4)
        # every forward router call followed its micro-batch's routing, once per micro-batch and layer
        _followed(r["fwd"], r["targets"])
        # training: the forward and the recomputation in backward of each micro-batch, for each local layer
        which = _followed(r["train"], r["train_targets"])
        assert r["num_train_mbs"] >= 3
        assert sorted(which) == sorted(list(range(r["num_train_mbs"])) * 2 * (NL // pp))


def test_configs_whose_routers_cannot_replay_are_refused():
    from nemo_prorl.policy.megatron_replay import check_replay_config

    ok = dict(num_moe_experts=4, num_layers=2, moe_layer_freq=1, moe_enable_routing_replay=True,
              moe_router_fusion=False, moe_router_load_balancing_type="aux_loss", context_parallel_size=1)
    check_replay_config(types.SimpleNamespace(**ok))
    for bad, match in [(dict(num_moe_experts=None), "no MoE layers"),
                       (dict(moe_enable_routing_replay=False), "moe_enable_routing_replay"),
                       (dict(moe_router_fusion=True), "moe_router_fusion"),
                       (dict(moe_router_load_balancing_type="sinkhorn"), "sinkhorn"),
                       (dict(context_parallel_size=2), "context parallelism")]:
        with pytest.raises((ValueError, RuntimeError), match=match):
            check_replay_config(types.SimpleNamespace(**{**ok, **bad}))


def _backlog_rank(rank: int, model_dir: str, store_path: str, out_dir: str) -> None:
    """One rank, block recompute of the first layer only: at every router call, the length of its
    replay_backward_list (the targets kept for a recomputation in backward)."""
    from megatron.core.transformer.moe.router import TopKRouter

    from nemo_prorl.config.schema import MegatronConfig, OptimConfig
    from nemo_prorl.policy.megatron_worker import MegatronWorker, WorkerSpec

    m = MegatronConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=1,
                       micro_batch_tokens=16, logprob_micro_batch_tokens=16, moe_aux_loss_coeff=0.0,
                       moe_router_load_balancing_type="none")
    spec = WorkerSpec(rank=rank, world_size=1, model_dir=model_dir, megatron=m,
                      optim=OptimConfig(lr=0.0, grad_clip=1e9), dtype="float32", seed=0, use_reference=False,
                      num_threads=1)
    worker = MegatronWorker(spec, torch.distributed.FileStore(store_path, 1))
    seen: list = []
    for mod in worker._module(worker.model[0]).modules():
        if isinstance(mod, TopKRouter):
            mod.register_forward_hook(
                lambda mod, a, out: seen.append((mod.layer_number, len(mod.router_replay.replay_backward_list))))
    batch = _replay_batch()
    worker.logprobs(batch, 1.0, False)
    fwd = list(seen)
    seen.clear()
    stats = worker.train_minibatch(batch, _sum_loss, 1.0, 0.0)
    torch.save({"fwd": fwd, "train": seen, "num_mbs": len(worker._split(batch, 16)), "grad_norm": stats["grad_norm"]},
               f"{out_dir}/backlog.pt")
    torch.distributed.destroy_process_group()


def test_replay_targets_are_kept_only_for_a_recomputation(moe_dir, tmp_path):
    """A router's target is kept after its forward only where the backward will recompute it (and pop it):
    in a logprob pass (forward only) and in the layers block recompute leaves out, every router call sees only
    its own micro-batch's target (before, every micro-batch's stayed on the device until the run's end); the
    recomputed first layer still finds its target in backward."""
    import torch.multiprocessing as mp

    mp.spawn(_backlog_rank, args=(str(moe_dir), str(tmp_path / "store"), str(tmp_path)), nprocs=1, join=True)
    r = torch.load(tmp_path / "backlog.pt", weights_only=False)
    n = r["num_mbs"]
    assert n >= 3
    assert sorted(r["fwd"]) == sorted((layer, 1) for layer in range(1, NL + 1) for _ in range(n))
    # training: each forward sees its own target; layer 1 is recomputed in backward, which pops it first
    assert sorted(r["train"]) == sorted([(layer, 1) for layer in range(1, NL + 1) for _ in range(n)]
                                        + [(1, 0)] * n)
    assert r["grad_norm"] > 0


def test_policy_refuses_routing_that_does_not_fit_before_sending_it(moe_dir):
    """The controller checks `routed_experts` against the model before any rank sees the batch (a rank
    that refused it alone would leave its expert-parallel peers waiting in the schedule): an expert
    outside the model, or a wrong shape, raises naming rollout.routing_replay; a fitting batch gets through
    to the ranks (here: none, so the policy's own 'shut down' error)."""
    from transformers import AutoConfig

    from nemo_prorl.policy.megatron import MegatronPolicy, MegatronWorkerError
    from nemo_prorl.policy.megatron_convert import ModelShape

    policy = object.__new__(MegatronPolicy)
    policy.shape, policy.group = ModelShape.from_hf_config(AutoConfig.from_pretrained(moe_dir)), None
    policy._per_rank_batches = lambda b: [b]  # (no Ray object store here)
    batch = _replay_batch()
    bad_expert = dict(batch, routed_experts=batch["routed_experts"].clone())
    bad_expert["routed_experts"][1, 6, 2, 1] = E
    bad_shape = dict(batch, routed_experts=batch["routed_experts"][:, :, :2])
    for bad, match in ((bad_expert, r"experts in \[0, 4\], the policy has experts \[0, 4\)"),
                       (bad_shape, "do not fit the policy")):
        with pytest.raises(ValueError, match=match) as e:
            policy.logprobs(bad, temperature=1.0)
        assert "rollout.routing_replay" in str(e.value)
        with pytest.raises(ValueError, match="rollout.routing_replay"):
            policy.train_minibatch(bad, _sum_loss, temperature=1.0)
    with pytest.raises(MegatronWorkerError, match="shut down"):
        policy.logprobs(batch, temperature=1.0)
