"""Routing replay's engine side with the real vLLM (CPU build): a tiny Qwen3-MoE built here, its routing
recorded by the engine (rollout.routing_replay: a capture hook on vLLM's routers in the CPU build) and
compared with the experts transformers' own router picks for the same tokens, through a TP=2 engine that
took synced weights; without routing replay the engine records nothing and samples the same.

Run with PRORL_VLLM_PYTHON (`make test` sets it and PRORL_REQUIRE_VLLM=1); skipped without it."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

from nemo_prorl.config.loader import load_config
from nemo_prorl.policy import POLICY_BACKENDS
from nemo_prorl.rollout import ROLLOUT_ENGINES, SamplingParams
from nemo_prorl.weight_sync import sync_weights
from tests.conftest import VLLM_PYTHON, VLLM_TINY

pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM interpreter (PRORL_VLLM_PYTHON; make vllm-env)")

LAYERS, EXPERTS, TOP_K = 2, 8, 2


def _cfg(model_dir: Path, out: Path, *extra: str):
    return load_config([*VLLM_TINY, f"model.path={model_dir}", f"trainer.output_dir={out}",
                        f"rollout.vllm.python={VLLM_PYTHON}", *extra])[0]


@pytest.fixture(scope="module")
def moe(vllm_model_dir, tmp_path_factory):
    """(model folder, tokenizer, hf policy with other weights than the folder's, prompts, TP=2 engine
    recording routing with the policy's weights synced)."""
    d = tmp_path_factory.mktemp("qwen3_moe")
    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    torch.manual_seed(0)
    # vLLM's CPU attention needs head_dim >= 32; two KV heads, so that TP=2 splits them. Each expert's FFN
    # is 32 wide, 16 per TP rank, which the CPU build pads to 32 for its kernel: the weight updates must
    # repack the experts (vllm_server.ProRLWorkerExtension) or they fail on that shape
    hf = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                        num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True,
                        max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    Qwen3MoeForCausalLM(hf).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path_factory.mktemp("moe_run")
    cfg = _cfg(d, out / "rec", "rollout.routing_replay=true", "rollout.vllm.tensor_parallel_size=2")
    policy = POLICY_BACKENDS.get("hf")(cfg, d)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # other weights than the folder's: the engine must take them from the sync
        for p in policy.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    engine = ROLLOUT_ENGINES.get("vllm")(cfg, d)
    try:
        sync_weights(policy, engine, bucket_mb=0.02)
        prompts = [tok.encode(f"add {i} and {5 * i}") for i in range(4)]
        yield d, tok, policy, prompts, engine
    finally:
        engine.close()
        policy.close()


def _params(tok) -> SamplingParams:
    return SamplingParams(n=3, temperature=1.0, top_p=1.0, max_tokens=8, stop_token_ids=(tok.eos_token_id,), seed=7)


def _hf_routing(model: torch.nn.Module, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' own routing of `ids` in fp32: (experts [T, layers, k], each layer's gap between the
    k-th and (k+1)-th router logit [T, layers], logprobs of ids[1:] [T - 1])."""
    picked, gaps = [], []

    def hook(module, args, out):
        logits, _, indices = out
        top = logits.float().topk(TOP_K + 1, dim=-1).values
        picked.append(indices)
        gaps.append(top[:, TOP_K - 1] - top[:, TOP_K])

    gates = [layer.mlp.gate for layer in model.model.layers]
    handles = [g.register_forward_hook(hook) for g in gates]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    lp = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    return torch.stack(picked, dim=1), torch.stack(gaps, dim=1), lp


def test_recorded_experts_are_the_ones_transformers_picks(moe):
    """Every token the engine fed (prompt + response minus its last token): the experts recorded for
    each MoE layer are the ones transformers' router picks for the same tokens with the synced weights
    (as sets: the order within the top-k is not part of the routing). Near-ties (k-th and (k+1)-th router
    logits within 1e-5) may flip between the two implementations' arithmetic: counted and printed."""
    _, tok, policy, prompts, engine = moe
    comps = engine.generate(prompts, _params(tok))
    assert len(comps) == 12
    model = policy.model.eval()
    rows = flips = 0
    worst_lp = 0.0
    for c in comps:
        fed = prompts[c.prompt_index] + c.token_ids[:-1]
        r = c.routed_experts
        assert r is not None and r.dtype == torch.int16 and tuple(r.shape) == (len(fed), LAYERS, TOP_K)
        want, gap, lp = _hf_routing(model, prompts[c.prompt_index] + c.token_ids)
        want, gap = want[: len(fed)], gap[: len(fed)]
        same = (r.long().sort(-1).values == want.sort(-1).values).all(-1)  # [T, layers]
        assert bool((same | (gap < 1e-5)).all()), f"experts differ away from a near-tie: {(~same).nonzero().tolist()}"
        rows += same.numel()
        flips += int((~same).sum())
        P = len(prompts[c.prompt_index])
        worst_lp = max(worst_lp, float((torch.tensor(c.logprobs) - lp[P - 1 :]).abs().max()))
    print(f"recorded vs transformers' routing: {rows - flips} of {rows} (token, layer) choices equal; "
          f"max |engine - transformers logprob| {worst_lp:.3g}")
    assert flips <= rows // 100 and worst_lp < 1e-4  # the engine ran the synced weights


def test_without_routing_replay_nothing_is_recorded_and_the_samples_are_the_same(moe, tmp_path):
    """rollout.routing_replay=false (and TP=1, prefix caching on): no routed experts; the samples are the
    recording TP=2 engine's (recording changes nothing it computes)."""
    d, tok, policy, prompts, rec = moe
    off = ROLLOUT_ENGINES.get("vllm")(_cfg(d, tmp_path / "off"), d)
    try:
        sync_weights(policy, off, bucket_mb=1.0)
        a, b = rec.generate(prompts, _params(tok)), off.generate(prompts, _params(tok))
    finally:
        off.close()
    assert all(c.routed_experts is None for c in b) and all(c.routed_experts is not None for c in a)
    same = [x.token_ids == y.token_ids for x, y in zip(a, b)]
    diff = max(abs(u - v) for x, y, s in zip(a, b, same) if s for u, v in zip(x.logprobs, y.logprobs))
    print(f"MoE TP=2 recording vs TP=1 not recording: {sum(same)} of {len(same)} identical, "
          f"max |logprob diff| {diff:.3g}")
    assert sum(same) >= len(same) - 1 and diff < 1e-5


def test_replay_brings_the_trainers_logprobs_to_the_vllm_engines(moe, tmp_path):
    """vLLM-CPU samples in bfloat16 and records its routing; the hf backend scores the samples in float32.
    Replaying the engine's experts brings the trainer's logprobs closer to the engine's than routing afresh
    (bfloat16 flips near-tied experts): both numbers asserted, on the same samples."""
    from nemo_prorl.algo.offpolicy import mismatch_metrics
    from nemo_prorl.trainer.batching import build_batch

    d, tok, policy, prompts, _ = moe
    engine = ROLLOUT_ENGINES.get("vllm")(_cfg(d, tmp_path / "bf16", "rollout.routing_replay=true",
                                              "model.dtype=bfloat16"), d)
    try:
        sync_weights(policy, engine, bucket_mb=1.0)
        comps = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=24,
                                                        stop_token_ids=(), seed=11))
    finally:
        engine.close()
    batch = build_batch(prompts, comps, tok.pad_token_id)
    mask = batch["response_mask"]
    gap = {}
    for name, b in (("replay", batch), ("fresh", {k: v for k, v in batch.items() if k != "routed_experts"})):
        lp = policy.logprobs(b, temperature=1.0)
        gap[name] = {k: float(v) for k, v in mismatch_metrics(lp, batch["rollout_logprobs"], mask, mask.sum()).items()}
    print({k: {m: round(v, 5) for m, v in g.items()} for k, g in gap.items()})
    assert gap["replay"]["mean_abs_logprob_diff"] < gap["fresh"]["mean_abs_logprob_diff"]
    assert gap["replay"]["k3_kl"] < gap["fresh"]["k3_kl"]
