"""Rollout routing replay (R3) on the embedded path, on a real tiny Qwen3-MoE built here: the torch engine
records the experts transformers' own routers pick, forcing is followed exactly and keeps the router
trainable, the batch lays routings out like its input ids, and replay brings the hf backend's logprobs of
an engine's samples closer to the engine's."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from nemo_prorl.algo.offpolicy import mismatch_metrics
from nemo_prorl.policy.routing import MoERouting, forced_gates
from nemo_prorl.rollout.base import Completion, SamplingParams
from nemo_prorl.rollout.torch_engine import TorchEngineServer, TorchRolloutEngine
from nemo_prorl.trainer.batching import build_batch

from tests.conftest import TINY_OVERRIDES

E, K, PAD = 8, 2, 0


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory):
    """Three layers, the middle one dense (mlp_only_layers): two MoE layers, so layer order matters."""
    torch.manual_seed(0)
    conf = Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                          num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                          num_experts=E, num_experts_per_tok=K, norm_topk_prob=True, mlp_only_layers=[1],
                          max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=PAD)
    model = Qwen3MoeForCausalLM(conf)
    # Weights of a size where the choice of experts matters to the next token (a fresh model's 0.02 makes its
    # experts and head near zero), and routers that prefer some experts clearly: fp32 noise flips no tie.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
            elif ".experts." in name:
                p.normal_(0, 0.15)
            elif name == "lm_head.weight":
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    model.save_pretrained(path)
    return path


PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]


def sampling(**kw) -> SamplingParams:
    return SamplingParams(**{**dict(n=2, temperature=1.0, top_p=1.0, max_tokens=6, stop_token_ids=(3,), seed=1), **kw})


def rerun_routing(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """transformers' own routing of `tokens`, one unpadded row, [T, layers, k]."""
    routing = MoERouting(model)
    try:
        with torch.no_grad(), routing.recording():
            model(input_ids=torch.tensor([tokens]))
        return routing.take(1)[0]
    finally:
        routing.remove()


@pytest.fixture(scope="module")
def hf_model(moe_dir):
    return AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_models(moe_dir, hf_model):
    return {"float32": hf_model, "bfloat16": AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.bfloat16).eval()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_records_the_routing_transformers_computes(moe_dir, hf_models, dtype):
    """Prefill (left-padded, two length buckets, shared by a prompt's samples) and decode steps record what
    transformers routes for the same tokens in one unpadded forward."""
    engine = TorchRolloutEngine(moe_dir, device="cpu", dtype=dtype, max_num_seqs=4, pad_token_id=PAD,
                                record_routing=True)
    comps = engine.generate(PROMPTS, sampling())
    assert len(comps) == 6
    for c in comps:
        fed = PROMPTS[c.prompt_index] + c.token_ids[:-1]
        assert c.routed_experts.dtype == torch.int16 and tuple(c.routed_experts.shape) == (len(fed), 2, K)
        assert torch.equal(c.routed_experts, rerun_routing(hf_models[dtype], fed))
    # without recording (rollout.routing_replay=false) completions carry no routing
    plain = TorchRolloutEngine(moe_dir, device="cpu", dtype="float32", max_num_seqs=4, pad_token_id=PAD)
    assert all(c.routed_experts is None for c in plain.generate(PROMPTS[:1], sampling()))


def test_rebuild_after_an_in_flight_update_keeps_the_latest_routing(moe_dir, hf_model):
    """A weight update at response token 3 rebuilds the KV cache: every token's routing is then the new
    weights' (the contract's latest forward wins), prompt included."""
    engine = TorchRolloutEngine(moe_dir, device="cpu", dtype="float32", max_num_seqs=4, pad_token_id=PAD,
                                record_routing=True)
    new = {n: t.detach().clone() for n, t in hf_model.state_dict().items()}
    for n in new:
        if n.endswith("mlp.gate.weight"):
            new[n] = -new[n]  # a different routing everywhere

    def update(t: int) -> None:
        if t == 3:
            engine.begin_weight_update()
            engine.load_weights(new.items())
            engine.finish_weight_update()
    engine.step_hook = update
    comps = engine.generate(PROMPTS[:2], sampling(stop_token_ids=(), max_tokens=6))
    updated = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    updated.load_state_dict(new)
    for c in comps:
        assert c.versions == [0, 0, 0, 1, 1, 1]
        fed = PROMPTS[c.prompt_index] + c.token_ids[:-1]
        assert torch.equal(c.routed_experts, rerun_routing(updated, fed))
        assert not torch.equal(c.routed_experts, rerun_routing(hf_model, fed))


def test_engine_server_returns_routing_as_a_tensor(moe_dir):
    """The actor's answer (what EnginePool turns back into Completions) holds plain data and tensors."""
    server = TorchEngineServer.__new__(TorchEngineServer)
    server.engine = TorchRolloutEngine(moe_dir, device="cpu", dtype="float32", max_num_seqs=4, pad_token_id=PAD,
                                       record_routing=True)
    p = dict(n=1, temperature=1.0, top_p=1.0, max_tokens=4, stop_token_ids=[], seed=1, stop=[])
    out = server.generate(PROMPTS[:1], p, [7])
    assert len(out) == 1 and isinstance(out[0][5], torch.Tensor) and out[0][5].shape == (5 + 4 - 1, 2, K)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forcing_is_followed_exactly(hf_models, dtype):
    hf_model = hf_models[dtype]
    ids = torch.tensor([[5, 9, 13, 21, 40, 2], [7, 7, 30, 31, 60, 61]])
    routing = MoERouting(hf_model)
    blocks = [m for m in hf_model.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"]
    seen = {}
    hook = blocks[0].register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    try:
        with torch.no_grad(), routing.recording():
            natural_logits = hf_model(input_ids=ids).logits
        natural = routing.take(2)
        # Forcing the experts the routers pick changes nothing, bit for bit.
        with torch.no_grad(), routing.forcing(natural), routing.recording():
            same = hf_model(input_ids=ids).logits
        assert torch.equal(same, natural_logits) and torch.equal(routing.take(2), natural)
        # Other experts (each shifted by one: still k distinct ones) are used as given...
        other = (natural.long() + 1) % E
        with torch.no_grad(), routing.forcing(other), routing.recording():
            forced_logits = hf_model(input_ids=ids).logits
        assert torch.equal(routing.take(2), other.to(torch.int16))
        assert (forced_logits - natural_logits).abs().max() > 1e-3
        # ...and the first MoE block computes sum_j gate_j * expert_{e_j}(x) with the router's softmax
        # renormalised over the forced experts.
        # (computed here in float32 from the block's own input and weights)
        x = seen["x"].reshape(-1, 64)
        idx = other[:, :, 0].reshape(-1, K)
        with torch.no_grad():
            gates = torch.softmax(blocks[0].gate(x)[0].float(), dim=-1).gather(-1, idx)
        gates = gates / gates.sum(-1, keepdim=True)
        ex, x = blocks[0].experts, x.float()
        want = torch.zeros_like(x)
        for j in range(K):
            gate_up = torch.einsum("nh,nih->ni", x, ex.gate_up_proj[idx[:, j]].detach().float())
            g, u = gate_up.chunk(2, dim=-1)
            want += gates[:, j, None] * torch.einsum("ni,nhi->nh", torch.nn.functional.silu(g) * u,
                                                     ex.down_proj[idx[:, j]].detach().float())
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=0, atol=0.02 * float(want.abs().max()))
        torch.testing.assert_close(seen["y"].reshape(-1, 64).float(), want, **tol)
        with pytest.raises(ValueError, match="do not fit this model"):
            with routing.forcing(other[:, :, :1]):
                pass
        with pytest.raises(ValueError, match="outside"):
            with routing.forcing(other + E):
                pass
    finally:
        hook.remove()
        routing.remove()


def test_forced_gates_golden():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0), math.log(4.0)]])
    idx = torch.tensor([[1, 3]])
    torch.testing.assert_close(forced_gates(logits, idx, False), torch.tensor([[0.2, 0.4]]))
    torch.testing.assert_close(forced_gates(logits, idx, True), torch.tensor([[1 / 3, 2 / 3]]))


def test_router_weights_get_gradient_under_replay(moe_dir):
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    routing = MoERouting(model)
    ids = torch.tensor([[5, 9, 13, 21, 40, 2]])
    with torch.no_grad(), routing.recording():
        model(input_ids=ids)
    other = (routing.take(1).long() + 3) % E
    with routing.forcing(other):
        model(input_ids=ids).logits.log_softmax(-1)[..., 11].sum().backward()
    grads = [r.weight.grad for r in routing.routers]
    assert len(grads) == 2 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_build_batch_lays_routing_out_like_input_ids():
    r0 = torch.arange(4 * 1 * K, dtype=torch.int16).view(4, 1, K) + 10  # prompt 2 + response 3 - 1
    r1 = torch.arange(3 * 1 * K, dtype=torch.int16).view(3, 1, K) + 50  # prompt 3 + response 1 - 1
    comps = [Completion(0, [1, 2, 3], [0.0] * 3, "stop", routed_experts=r0),
             Completion(1, [4], [0.0], "stop", routed_experts=r1)]
    b = build_batch([[7, 8], [9, 9, 9]], comps, PAD)
    assert b["routed_experts"].shape == (2, 3 + 3, 1, K) and b["routed_experts"].dtype == torch.uint8  # 1 byte an id
    assert torch.equal(b["routed_experts"][0, 1:5], r0) and torch.equal(b["routed_experts"][1, 0:3], r1)
    # padding and each last response token: a spread of k distinct experts per position over the experts the
    # completions name (0..55 here): flattened position n takes (n * k + 0..k-1) mod 56, not 0..k-1 everywhere
    for row, col in [(0, 0), (0, 5), (1, 3), (1, 4), (1, 5)]:
        n = row * 6 + col
        assert b["routed_experts"][row, col, 0].tolist() == [(n * K + j) % 56 for j in range(K)]
    with pytest.raises(ValueError, match="some completions carry routed experts"):
        build_batch([[7, 8], [9, 9, 9]], [comps[0], Completion(1, [4], [0.0], "stop")], PAD)
    with pytest.raises(ValueError, match="expected"):
        build_batch([[7, 8], [9, 9, 9]], [comps[0], Completion(1, [4, 5], [0.0] * 2, "stop", routed_experts=r1)], PAD)


def test_mismatch_k3_kl_golden():
    policy, rollout = torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[0.0, -1.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    m = mismatch_metrics(policy, rollout, mask, mask.sum())
    assert m["k3_kl"].item() == pytest.approx((math.exp(0.5) - 1 - 0.5) / 2)
    assert m["mean_abs_logprob_diff"].item() == pytest.approx(0.25)


def test_replay_brings_the_trainers_logprobs_to_the_engines(moe_dir):
    """The engine samples in bfloat16, the hf backend computes in float32 (a real precision mismatch that
    flips near-tied experts): replaying the engine's experts shrinks the logprob gap (measured: mean
    |dlogp| 0.011 with replay vs 0.034 without, k3 KL 1.0e-4 vs 1.8e-2, worst token 0.046 vs 1.32)."""
    from nemo_prorl.config import load_config
    from nemo_prorl.policy.hf import HFPolicy

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={moe_dir}", "rollout.routing_replay=true"])
    engine = TorchRolloutEngine(moe_dir, device="cpu", dtype="bfloat16", max_num_seqs=8, pad_token_id=PAD,
                                record_routing=True)
    comps = engine.generate(PROMPTS, sampling(n=4, max_tokens=8, stop_token_ids=()))
    batch = build_batch(PROMPTS, comps, PAD)
    policy = HFPolicy(cfg, moe_dir, use_reference=False)
    mask = batch["response_mask"]
    gap = {}
    for name, b in (("replay", batch), ("none", {k: v for k, v in batch.items() if k != "routed_experts"})):
        lp = policy.logprobs(b, temperature=1.0)
        gap[name] = mismatch_metrics(lp, batch["rollout_logprobs"], mask, mask.sum())
    print({k: {m: round(float(v), 5) for m, v in g.items()} for k, g in gap.items()})
    # replay removes the flipped experts; what is left is bfloat16's own rounding
    assert gap["replay"]["mean_abs_logprob_diff"] < 0.5 * gap["none"]["mean_abs_logprob_diff"]
    assert gap["replay"]["k3_kl"] < 0.1 * gap["none"]["k3_kl"]
    assert gap["replay"]["max_abs_logprob_diff"] < 0.1 < gap["none"]["max_abs_logprob_diff"]


def test_replay_on_a_dense_model_names_the_key(moe_dir, tiny_model_dir):
    from nemo_prorl.config import load_config
    from nemo_prorl.config.loader import ConfigError

    for dense in ([], [f"model.path={tiny_model_dir}"]):  # the tiny qwen2, built or from its folder
        with pytest.raises(ConfigError, match="rollout.routing_replay"):
            load_config([*TINY_OVERRIDES, *dense, "rollout.routing_replay=true"])
    load_config([*TINY_OVERRIDES, f"model.path={moe_dir}", "rollout.routing_replay=true"])
    with pytest.raises(ValueError, match="rollout.routing_replay"):
        TorchRolloutEngine(tiny_model_dir, device="cpu", dtype="float32", max_num_seqs=4, pad_token_id=PAD,
                           record_routing=True)


def test_one_grpo_step_replays_the_engines_routing(tiny_model_dir, tmp_path):
    """The real trainer, one step, a Qwen3-MoE with the tiny model's tokenizer, two torch engine actors
    (Ray: the routing crosses from the actors to the controller as tensors): the engines' routing reaches
    the hf backend's logprob and training forwards, and the step reports the mismatch with and without
    replay (the engines and the policy compute in float32 with the same weights: both tiny)."""
    from transformers import AutoTokenizer

    from nemo_prorl.config import load_config
    from nemo_prorl.train import build_trainer
    from nemo_prorl.trainer.phases import PhaseTimer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    conf = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                          num_experts=E, num_experts_per_tok=K, max_position_embeddings=256,
                          tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model_dir = tmp_path / "moe"
    Qwen3MoeForCausalLM(conf).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg, resolved = load_config([*TINY_OVERRIDES, f"model.path={model_dir}", f"trainer.output_dir={tmp_path / 'run'}",
                                 "rollout.routing_replay=true", "rollout.num_engines=2",
                                 "algo.dynamic_sampling.enabled=false",
                                 "validation.every_n_steps=0"])
    trainer = build_trainer(cfg, resolved)
    seen = []
    for name in ("logprobs", "train_minibatch"):
        real = getattr(trainer.policy, name)

        def spy(batch, *a, _real=real, _name=name, **kw):
            seen.append((_name, "routed_experts" in batch))
            return _real(batch, *a, **kw)
        setattr(trainer.policy, name, spy)
    try:
        assert type(trainer.engine).__name__ == "EnginePool"
        metrics = trainer.train_step(1, PhaseTimer())
    finally:
        trainer.engine.close()
        trainer.policy.close()
    assert ("train_minibatch", True) in seen and ("logprobs", True) in seen and ("logprobs", False) in seen
    assert all(ok for name, ok in seen if name == "train_minibatch")
    assert metrics["actor/update_skipped"] == 0 and metrics["actor/grad_norm"] > 0
    assert metrics["mismatch/mean_abs_logprob_diff"] < 1e-4
    assert "mismatch/no_replay_mean_abs_logprob_diff" in metrics and "mismatch/no_replay_k3_kl" in metrics


def test_vllm_cpu_routing_hook_runs_eager_without_prefix_caching(moe_dir):
    """The CPU build's routing hook sees only the tokens vLLM computes, outside a compiled graph: with routing
    replay the engine runs eager and without prefix caching whatever rollout.vllm says (the compiled default
    froze the hook's batch layout at trace time: 'routing of request 0 sample 0 was recorded for other
    tokens'); without replay the user's settings stand."""
    from nemo_prorl.config import load_config
    from nemo_prorl.rollout.vllm_engine import engine_spec

    base = [*TINY_OVERRIDES, f"model.path={moe_dir}", "rollout=vllm", "rollout.vllm.enforce_eager=false",
            "rollout.vllm.enable_prefix_caching=true"]
    spec = engine_spec(load_config([*base, "rollout.routing_replay=true"])[0], moe_dir)
    assert (spec["routing"], spec["enforce_eager"], spec["enable_prefix_caching"]) == ("hook", True, False)
    spec = engine_spec(load_config(base)[0], moe_dir)
    assert (spec["routing"], spec["enforce_eager"], spec["enable_prefix_caching"]) == (None, False, True)
