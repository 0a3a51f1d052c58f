"""Broad rollouts (BroRL, n in the hundreds): the torch engine's shared prompt cache gives the copying cache's
tokens and logprobs bit for bit while holding each prompt's keys/values once; advantages and micro-batches
stay flat as n grows; the brorl presets compose."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_prorl.config import load_config
from nemo_prorl.rollout.base import Completion, SamplingParams
from nemo_prorl.rollout.shared_prefix import SharedPrefixLayer
from nemo_prorl.rollout.torch_engine import TorchRolloutEngine
from tests.test_routing_replay import PAD, PROMPTS as MOE_PROMPTS, moe_dir  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path) -> tuple[Any, list[list[int]]]:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                               tokenize=False)) for c in ("reverse 123", "sort 98765", "reverse 4")]
    # chat prompts of a few lengths in one bucket, a short one, and one longer than a PAD_BUCKET (other chunks)
    return tok, chat + [chat[0][:5], chat[1] + chat[2][-20:]]


def make_engine(model_dir: Path, tok: Any, max_num_seqs: int = 256) -> TorchRolloutEngine:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TorchRolloutEngine(model_dir, device="cpu", dtype="float32", max_num_seqs=max_num_seqs,
                              pad_token_id=pad, tokenizer=tok)


def both(engine: TorchRolloutEngine, prompts: list[list[int]], p: SamplingParams) -> tuple[list[Completion], ...]:
    out = []
    for share in (False, True):
        engine.share_prompt_cache = share
        out.append(engine.generate(prompts, p))
    return tuple(out)


def assert_identical(a: list[Completion], b: list[Completion]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.prompt_index, x.token_ids, x.finish_reason, x.versions) == (y.prompt_index, y.token_ids,
                                                                             y.finish_reason, y.versions)
        assert x.logprobs == y.logprobs  # exact floats, not a tolerance


@pytest.mark.parametrize("n,max_num_seqs,stop", [(1, 256, False), (8, 256, True), (20, 16, True)])
def test_shared_prompt_cache_gives_the_copying_caches_tokens_bit_for_bit(tiny_model_dir, setup, n, max_num_seqs,
                                                                        stop):
    """n=1 (nothing shared), n=8 over prompts of different lengths and buckets with EOS and a stop string,
    and n=20 over max_num_seqs=16 (a prompt's samples span two chunks; the pieces of 4 of four prompts share one)."""
    tok, prompts = setup
    engine = make_engine(tiny_model_dir, tok, max_num_seqs)
    p = SamplingParams(n=n, temperature=1.3, top_p=0.95, max_tokens=10, seed=7,
                       stop_token_ids=(tok.eos_token_id,) if stop else (), stop=("7",) if stop else ())
    copied, shared = both(engine, prompts, p)
    assert_identical(copied, shared)
    assert len(shared) == n * len(prompts)
    if stop:  # the stop paths ran: some rows stopped early, some ran to the length limit
        assert {c.finish_reason for c in shared} == {"stop", "length"}


def test_an_in_flight_weight_update_rebuilds_and_reshares_the_cache(tiny_model_dir, setup):
    """A weight update at response token 3 rebuilds the KV cache over prompt + response (rollout/torch_engine.py);
    the rebuilt cache holds the prompt once again, and the tokens match the copying cache's."""
    tok, prompts = setup
    new = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    g = torch.Generator().manual_seed(1)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in new.items()}
    p = SamplingParams(n=8, temperature=1.0, top_p=1.0, max_tokens=6, stop_token_ids=(), seed=3)
    runs, kinds = [], []
    for share in (False, True):
        engine = make_engine(tiny_model_dir, tok)
        engine.share_prompt_cache = share
        real = engine._next_logits

        def spy(nxt: Any, mask: Any, last_pos: Any, cache: Any, version: int, *rest: Any) -> Any:
            kinds.append((share, version, {type(layer) for layer in cache.layers}))  # the cache a step is given
            return real(nxt, mask, last_pos, cache, version, *rest)
        engine._next_logits = spy

        def update(t: int, engine: TorchRolloutEngine = engine) -> None:
            if t == 3:
                engine.begin_weight_update()
                engine.load_weights(new.items())
                engine.finish_weight_update(version=1)
        engine.step_hook = update
        runs.append(engine.generate(prompts[:2], p))
    assert_identical(*runs)
    assert all(c.versions == [0, 0, 0, 1, 1, 1] for c in runs[1])
    # after the rebuild (version 1) the shared run's layers hold the prompt once again
    assert {SharedPrefixLayer} == set().union(*(k for s, v, k in kinds if s and v == 1))
    assert SharedPrefixLayer not in set().union(*(k for s, _, k in kinds if not s))


def test_routing_replay_records_the_same_experts_with_a_shared_cache(moe_dir):  # noqa: F811
    engine = TorchRolloutEngine(moe_dir, device="cpu", dtype="float32", max_num_seqs=8, pad_token_id=PAD,
                                record_routing=True)
    p = SamplingParams(n=6, temperature=1.0, top_p=1.0, max_tokens=6, stop_token_ids=(3,), seed=1)
    copied, shared = both(engine, MOE_PROMPTS, p)
    assert_identical(copied, shared)
    for a, b in zip(copied, shared):
        assert torch.equal(a.routed_experts, b.routed_experts)


def test_the_held_prompt_cache_does_not_grow_with_n(tiny_model_dir, setup):
    """Bytes of the key/value tensors held (engine.peak_cache_bytes, after each decode step), against the
    layout: copying holds rows x (P + t) positions per layer, sharing prompts x P + rows x t."""
    tok, prompts = setup
    engine = make_engine(tiny_model_dir, tok)
    engine.track_cache_bytes = True
    conf = engine.model.config
    head_dim = conf.hidden_size // conf.num_attention_heads
    per_position = conf.num_hidden_layers * 2 * conf.num_key_value_heads * head_dim * 4  # float32 keys + values
    prompt, T = prompts[:1], 4  # one chat prompt (P = 16 or 32 columns), T response tokens, no stop token
    P = -(-len(prompt[0]) // 16) * 16
    held = {}
    for n in (16, 64):
        p = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=T, stop_token_ids=(), seed=0)
        for share in (False, True):
            engine.share_prompt_cache = share
            engine.generate(prompt, p)
            held[n, share] = engine.peak_cache_bytes
    for n in (16, 64):  # the last decode step takes token T - 1 in: T generated positions per row
        assert held[n, False] == per_position * n * (P + T)
        assert held[n, True] == per_position * (1 * P + n * T)
    assert held[64, True] - held[16, True] == per_position * 48 * T  # only the suffix grows with n


# ------------------------------------------------------------------ flat in n: advantages, micro-batches
def test_advantages_for_512_samples_equal_a_reference():
    """GRPO's z-score and REINFORCE++-baseline's whitening over groups of BroRL's n = 512, against a plain
    per-group float64 computation (statistics' sample std, as verl's torch.std)."""
    import statistics

    from nemo_prorl.algo.advantages import grpo_advantages, reinforce_pp_baseline_advantages

    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(3, 512, generator=g) < torch.tensor([[0.02], [0.5], [0.97]])).float()
    rewards[2] = 1.0  # one group without signal: exactly 0
    adv = grpo_advantages(rewards)
    for i, row in enumerate(rewards.double().tolist()):
        if len(set(row)) == 1:
            assert torch.equal(adv[i], torch.zeros(512))
            continue
        mean, std = statistics.fmean(row), statistics.stdev(row)
        ref = torch.tensor([(r - mean) / (std + 1e-6) for r in row], dtype=torch.float32)
        assert torch.allclose(adv[i], ref, rtol=1e-6, atol=1e-6)
    centred = [[r - statistics.fmean(row) if len(set(row)) > 1 else 0.0 for r in row]
               for row in rewards.double().tolist()]
    flat = [x for row in centred for x in row]
    mu, var = statistics.fmean(flat), statistics.variance(flat)
    ref = torch.tensor([(x - mu) / (var + 1e-8) ** 0.5 for x in flat], dtype=torch.float32).view(3, 512)
    assert torch.allclose(reinforce_pp_baseline_advantages(rewards), ref, rtol=1e-5, atol=1e-6)


def test_micro_batches_of_256_samples_stay_within_the_token_budget():
    """One prompt's 256 samples of lengths 1..64: every micro-batch holds at most the budget of padded tokens
    and is cut to its own longest row, not the step's."""
    from nemo_prorl.policy.microbatch import split_micro_batches
    from nemo_prorl.trainer.batching import build_batch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 65, (256,), generator=g).tolist()
    comps = [Completion(prompt_index=0, token_ids=[5] * r, logprobs=[-1.0] * r, finish_reason="stop",
                        versions=[0] * r) for r in lengths]
    batch = build_batch([[7] * 20], comps, pad_token_id=0)
    mbs = split_micro_batches(batch, 1024, pad_token_id=0)
    assert sorted(torch.cat([mb.rows for mb in mbs]).tolist()) == list(range(256))
    for mb in mbs:
        assert mb.num_tokens <= 1024
        assert mb.tokens.shape[1] == max(20 + lengths[r] for r in mb.rows.tolist())
    assert sum(mb.num_tokens for mb in mbs) < 256 * (20 + 64)  # less padding than the step's width


# ------------------------------------------------------------------ the presets
def test_brorl_1p5b_pins_its_recipe():
    cfg, _ = load_config(["experiment=brorl_1p5b"])
    a, r = cfg.algo, cfg.rollout
    assert cfg.experiment_name == "brorl_1p5b"
    assert (a.num_generations_per_prompt, a.num_prompts_per_step, a.num_prompts_per_minibatch) == (512, 32, 8)
    # ProRL's recipe otherwise (experiment=prorl_1p5b)
    assert (a.clip_eps_low, a.clip_eps_high, a.kl_coef, a.loss_agg_mode) == (0.2, 0.4, 1e-4, "token-mean")
    assert a.dynamic_sampling.enabled and cfg.policy.optim.lr == 2e-6 and r.temperature == 1.2
    assert cfg.model.path.endswith("Nemotron-Research-Reasoning-Qwen-1.5B")
    # broad rollouts that fit: vLLM with n per request and prefix caching, a prompt's samples decoded together
    assert r.engine == "vllm" and r.vllm.enable_prefix_caching and r.max_num_seqs == 512
    assert r.max_response_length == 16384 and r.share_prompt_cache
    assert cfg.policy.megatron.micro_batch_tokens >= 2 * (cfg.data.max_prompt_length + r.max_response_length)
    assert cfg.policy.megatron.logprob_micro_batch_tokens == 2 * cfg.policy.megatron.micro_batch_tokens


def test_brorl_cpu_tiny_is_cpu_tiny_with_broad_rollouts():
    tiny, _ = load_config(["experiment=cpu_tiny"])
    bro, _ = load_config(["experiment=brorl_cpu_tiny"])
    assert (bro.algo.num_prompts_per_step, bro.algo.num_generations_per_prompt) == (4, 64)
    # the same samples per step and per update, the same validation: the two tables compare
    assert bro.algo.num_prompts_per_step * bro.algo.num_generations_per_prompt == \
        tiny.algo.num_prompts_per_step * tiny.algo.num_generations_per_prompt
    assert bro.algo.num_prompts_per_minibatch * 64 == tiny.algo.num_prompts_per_minibatch * 8
    assert bro.validation == tiny.validation and bro.data.num_validation_prompts == tiny.data.num_validation_prompts
    assert bro.trainer.num_steps == tiny.trainer.num_steps and bro.rollout == tiny.rollout
    assert bro.rollout.max_num_seqs >= bro.algo.num_generations_per_prompt  # a prompt's samples in one chunk
