"""rollout=vllm with the real vLLM (the CPU build, in its own virtualenv: `make vllm-env`): generation,
weights resharded from Megatron TP=2 shards after a training step, the Llama loader, the trainer loop,
and a dying engine process.

`make test` sets PRORL_VLLM_PYTHON and PRORL_REQUIRE_VLLM=1, so in CI these tests run or fail; elsewhere,
without that interpreter, they are skipped."""

import copy
import functools
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from nemo_prorl.config.loader import load_config
from nemo_prorl.policy import POLICY_BACKENDS
from nemo_prorl.policy.base import PolicyBackend
from nemo_prorl.policy.megatron_convert import ModelShape, hf_to_megatron, megatron_to_hf_lazy
from nemo_prorl.rollout import ROLLOUT_ENGINES, SamplingParams
from nemo_prorl.rollout.vllm_engine import VLLMEngineError
from nemo_prorl.rollout.vllm_server import TMP_ENV
from nemo_prorl.train import run_training
from nemo_prorl.trainer.batching import build_batch
from nemo_prorl.trainer.grpo import microbatch_loss
from nemo_prorl.weight_sync import load_into_engine, sync_weights
from tests.checks import assert_every_step_updated
from tests.conftest import TINY_OVERRIDES, VLLM_PYTHON, VLLM_TINY

pytestmark = pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM interpreter (PRORL_VLLM_PYTHON; make vllm-env)")


def _cfg(model_dir: Path, out: Path, *extra: str):
    return load_config([*VLLM_TINY, f"model.path={model_dir}", f"trainer.output_dir={out}",
                        f"rollout.vllm.python={VLLM_PYTHON}", *extra])


@pytest.fixture(scope="module")
def setup(vllm_model_dir, tmp_path_factory):
    cfg, _ = _cfg(vllm_model_dir, tmp_path_factory.mktemp("vllm_run"))
    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    engine = ROLLOUT_ENGINES.get("vllm")(cfg, vllm_model_dir)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                                  tokenize=False)) for c in ("reverse 123", "sort 98765")]
    yield cfg, tok, engine, prompts
    engine.close()


def params(tok, **kw):
    base = dict(n=4, temperature=1.0, top_p=1.0, max_tokens=10, stop_token_ids=(tok.eos_token_id,), seed=3)
    return SamplingParams(**{**base, **kw})


def mismatch(policy: PolicyBackend, engine, prompts, tok, **kw) -> float:
    """Largest |policy logprob - engine sampling logprob| over the tokens the engine samples."""
    comps = engine.generate(prompts, params(tok, **kw))
    batch = build_batch(prompts, comps, tok.pad_token_id)
    lp = policy.logprobs(batch, temperature=kw.get("temperature", 1.0))
    return float(((lp - batch["rollout_logprobs"]).abs() * batch["response_mask"]).max())


def test_generation_shape_order_seeds_and_stops(setup):
    cfg, tok, engine, prompts = setup
    a = engine.generate(prompts, params(tok))
    assert [c.prompt_index for c in a] == [0] * 4 + [1] * 4
    for c in a:
        assert 1 <= len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.finish_reason == ("stop" if c.token_ids[-1] == tok.eos_token_id else "length")
    assert [c.token_ids for c in engine.generate(prompts, params(tok))] == [c.token_ids for c in a]
    assert [c.token_ids for c in engine.generate(prompts, params(tok, seed=4))] != [c.token_ids for c in a]
    # the 4 samples of a prompt differ (each has its own random stream)
    assert len({tuple(c.token_ids) for c in a[:4]}) > 1
    short = engine.generate(prompts, params(tok, max_tokens=2, temperature=2.0))  # vLLM caps it at 2
    assert all(len(c.token_ids) <= 2 for c in short) and any(c.finish_reason == "length" for c in short)
    stopped = engine.generate(prompts, params(tok, n=8, stop=("2",), temperature=1.5))
    hits = [c for c in stopped if "2" in tok.decode(c.token_ids)]
    assert hits and all(tok.decode(c.token_ids).endswith("2") and c.finish_reason == "stop" for c in hits)


def test_sampling_logprobs_match_the_policy(setup, vllm_model_dir):
    cfg, tok, engine, prompts = setup
    policy = POLICY_BACKENDS.get("hf")(cfg, vllm_model_dir)
    sync_weights(policy, engine, bucket_mb=1.0)
    assert mismatch(policy, engine, prompts, tok) < 1e-4
    assert mismatch(policy, engine, prompts, tok, temperature=0.7) < 1e-4  # temperature applied the same way


def _train_step(policy, engine, prompts, tok):
    comps = engine.generate(prompts, params(tok))
    batch = build_batch(prompts, comps, tok.pad_token_id)
    batch["advantages"] = torch.linspace(-1, 1, len(comps))
    loss = functools.partial(microbatch_loss, clip_eps_low=0.2, clip_eps_high=0.4, clip_ratio_c=None,
                             global_num_tokens=batch["response_mask"].sum(), global_num_seqs=8.0, horizon=10,
                             loss_agg_mode="token-mean", kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0)
    m = policy.train_minibatch(batch, loss, temperature=1.0)
    assert m["update_skipped"] == 0.0 and m["grad_norm"] > 0


@pytest.mark.parametrize("backend", ["hf", "megatron"])
def test_weights_after_a_training_step_reach_vllm(setup, vllm_model_dir, backend):
    cfg, tok, engine, prompts = setup
    c = copy.deepcopy(cfg)
    c.policy.optim.lr = 0.05  # a large step, so that stale weights are unmistakable
    c.policy.backend = backend
    c.policy.megatron.tensor_parallel_size = 2  # vLLM gets full tensors gathered from two TP shards
    policy = POLICY_BACKENDS.get(backend)(c, vllm_model_dir)
    try:
        sync_weights(policy, engine, bucket_mb=1.0)
        assert mismatch(policy, engine, prompts, tok) < 1e-4
        _train_step(policy, engine, prompts, tok)
        assert mismatch(policy, engine, prompts, tok) > 1e-2  # the check can fail: vLLM still has the old weights
        stats = sync_weights(policy, engine, bucket_mb=0.02)  # small buckets: several per layer stack
        assert stats.num_buckets > 5
        assert mismatch(policy, engine, prompts, tok) < 1e-4
    finally:
        policy.close()


def test_weights_split_anywhere_still_load(setup, vllm_model_dir):
    """Even one tensor per call (q, k and v of one layer in separate buckets) loads correctly: vLLM's
    layerwise reload buffers the early ones, and the engine copies them out of the reused buffer."""
    cfg, tok, engine, prompts = setup
    policy = POLICY_BACKENDS.get("hf")(cfg, vllm_model_dir)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.begin_weight_update()
    for name, t in policy.named_weights():
        engine.load_weights([(name, t)])
    engine.finish_weight_update()
    assert mismatch(policy, engine, prompts, tok) < 1e-4


def test_llama_weights_from_megatron_shards_load_into_vllm(vllm_model_dir, tmp_path):
    """The Llama loader takes the stream too: a tiny Llama, resharded from TP=2 Megatron shards of
    other weights, samples what transformers computes for those weights."""
    d = tmp_path / "llama"
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(lcfg).save_pretrained(d)
    tok.save_pretrained(d)
    target = LlamaForCausalLM(lcfg).eval()  # different random weights: what vLLM must end up with
    s = ModelShape.from_hf_config(lcfg)
    shards = [[hf_to_megatron(target.state_dict(), s, tp_rank=r, tp=2) for r in range(2)]]
    cfg, _ = _cfg(d, tmp_path / "run")
    engine = ROLLOUT_ENGINES.get("vllm")(cfg, d)
    try:
        stats = load_into_engine(megatron_to_hf_lazy(shards, s), engine, bucket_mb=0.0625)
        assert stats.num_buckets > 3 and stats.num_tensors == len(target.state_dict())
        prompt = tok.encode("reverse 123")
        comps = engine.generate([prompt], SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=8,
                                                         stop_token_ids=(), seed=1))
    finally:
        engine.close()
    for c in comps:
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logp = target(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        ref = logp.gather(-1, torch.tensor(c.token_ids).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_training_loop_with_vllm_logs_the_mismatch(vllm_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg, resolved = _cfg(vllm_model_dir, out, "trainer.num_steps=2", "validation.every_n_steps=2",
                         "algo.dynamic_sampling.enabled=false", "algo.rollout_correction.mode=tis")
    run_training(cfg, resolved)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if "actor/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert_every_step_updated(train)
    for r in train:
        assert r["mismatch/mean_abs_logprob_diff"] < 1e-4 and 1.0 <= r["mismatch/mult_prob_error"] < 1.0001
        assert r["actor/rollout_is/mean_weight"] == pytest.approx(1.0, abs=1e-3)
        assert r["sync/megabytes"] > 0
    assert any("val/pass@1" in r for r in rows)
    assert "Successfully reset prefix cache" in (out / "vllm_engine.log").read_text()


def test_eval_with_vllm_matches_the_torch_engine_when_greedy(vllm_model_dir, tmp_path):
    """`prorl eval` samples with the configured engine: near-greedy, vLLM and the torch engine produce the
    same answers (this barely trained model has near-ties between tokens, so a few may differ)."""
    from nemo_prorl.eval.runner import evaluate_all

    per_prompt, texts = {}, {}
    for engine in ("vllm", "torch"):
        cfg, _ = _cfg(vllm_model_dir, tmp_path / "run", f"rollout.engine={engine}", "eval.temperature=0.001",
                      "eval.num_samples_per_prompt=2", "eval.pass_k=[1,2]", "data.num_validation_prompts=16",
                      "eval.save_samples=true")
        # the same folder twice: the second time its weights are streamed into the running engine
        report = evaluate_all(cfg, [str(vllm_model_dir)] * 2, tmp_path / engine)["checkpoints"]
        first, again = report[vllm_model_dir.name], report[f"{vllm_model_dir.name}#2"]
        assert (first["engine"], again["engine"]) == ("started", "synced")
        assert again["tasks"] == first["tasks"]
        per_prompt[engine] = {t: v["per_prompt"] for t, v in first["tasks"].items()}
        rows = [json.loads(line) for line in open(tmp_path / engine / "samples" / f"{vllm_model_dir.name}.jsonl")]
        texts[engine] = [(r["uid"], r["sample"], r["response"]) for r in rows]
    assert len(texts["vllm"]) == len(texts["torch"]) == 32
    assert sum(a == b for a, b in zip(texts["vllm"], texts["torch"])) >= 29
    assert len({t for _, _, t in texts["vllm"]}) > 1  # real, varied answers
    assert per_prompt["vllm"].keys() == per_prompt["torch"].keys() == {"reverse", "sort"}


def test_a_dead_engine_process_is_reported(vllm_model_dir, tmp_path):
    cfg, _ = _cfg(vllm_model_dir, tmp_path / "run")
    broken = tmp_path / "broken"
    shutil.copytree(vllm_model_dir, broken)
    save_file({"nonsense": torch.zeros(1)}, str(broken / "model.safetensors"))
    with pytest.raises(VLLMEngineError, match=r"vllm engine 0 on node 0 \(.*\) failed during init(.|\n)*"
                                              r"(nonsense|model\.)(.|\n)*vllm_engine.log"):
        ROLLOUT_ENGINES.get("vllm")(cfg, broken)
    engine = ROLLOUT_ENGINES.get("vllm")(cfg, vllm_model_dir)
    folder = Path(engine.setup.env[TMP_ENV])
    try:
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(VLLMEngineError, match=r"vllm engine 0 on node 0 \(.*\) died during generate"):
            engine.generate([[1, 2, 3]], SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=2,
                                                        stop_token_ids=(), seed=0))
    finally:
        engine.close()
    assert not folder.exists()  # with what the killed engine left there (vllm_dist_*: see the test below)


def test_vllm_keeps_its_temporary_files_in_the_pools_folder(setup):
    """vLLM's file:// rendezvous (vllm_dist_*) goes to the pool's private folder, removed when the pool closes,
    not to /tmp, where each engine that was killed rather than shut down left one."""
    folder = Path(setup[2].setup.env[TMP_ENV])
    assert folder.is_dir() and any(folder.glob("vllm_dist_*")), sorted(p.name for p in folder.iterdir())


def test_two_engines_generate_what_one_engine_does(setup, vllm_model_dir, tmp_path):
    """Two vLLM engine actors, each given half of the prompts with the prompts' own seeds, return what one
    engine returns. vLLM's CPU build has no batch-invariant kernels, so a prompt's logits may differ in the
    last bits with the batch it is decoded in: sequences must be identical at least 99% of the time (a
    near-tie between two tokens is the only way to differ), their logprobs within 1e-5."""
    cfg, tok, one, _ = setup
    c2, _ = _cfg(vllm_model_dir, tmp_path / "two", "rollout.num_engines=2")
    two = ROLLOUT_ENGINES.get("vllm")(c2, vllm_model_dir)
    try:
        assert len(two.group.actors) == 2 and two.engine_nodes() == [0, 0]
        policy = POLICY_BACKENDS.get("hf")(cfg, vllm_model_dir)  # earlier tests left other weights in `one`
        for engine in (one, two):
            sync_weights(policy, engine, bucket_mb=1.0)
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"add {i} and {7 * i}"}],
                                                      add_generation_prompt=True, tokenize=False)) for i in range(13)]
        p = params(tok, n=8, temperature=1.2)
        a, b = one.generate(prompts, p), two.generate(prompts, p)
    finally:
        two.close()
    assert [c.prompt_index for c in a] == [c.prompt_index for c in b] == [i for i in range(13) for _ in range(8)]
    same = [x.token_ids == y.token_ids for x, y in zip(a, b)]
    print(f"2 vLLM engines vs 1: {sum(same)} of {len(same)} sequences identical")
    assert sum(same) >= 0.99 * len(same)
    for x, y, s in zip(a, b, same):
        if s:
            assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < 1e-5
    assert len({tuple(c.token_ids) for c in a}) > 50  # varied samples


def test_a_tp2_engine_generates_what_tp1_does_and_takes_synced_weights(setup, vllm_model_dir, tmp_path):
    """rollout.vllm.tensor_parallel_size=2: one engine actor whose two vLLM worker processes (gloo, one
    core each on CPU) split every layer. The synced full tensors are resharded by vLLM's loader: before the
    sync the engine still samples the folder's weights (the check can fail), after it the policy's. It then
    samples what the TP=1 engine samples with the same weights and seeds: TP's all-reduce sums partial
    products in another order, so the logprobs differ in the last bits (measured below 1e-5); a near-tie
    between two tokens is the only way for a sequence to differ."""
    cfg, tok, one, prompts = setup
    c2, _ = _cfg(vllm_model_dir, tmp_path / "tp2", "rollout.vllm.tensor_parallel_size=2")
    two = ROLLOUT_ENGINES.get("vllm")(c2, vllm_model_dir)
    try:
        assert len(two.group.actors) == 1 and [e.devices for e in two.plan.engines] == [(0, 1)]
        policy = POLICY_BACKENDS.get("hf")(cfg, vllm_model_dir)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in policy.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        before = mismatch(policy, two, prompts, tok)
        for engine in (one, two):
            sync_weights(policy, engine, bucket_mb=0.02)
        after = mismatch(policy, two, prompts, tok)
        print(f"TP=2 engine vs the policy: {before:.3g} before the sync, {after:.3g} after")
        assert before > 1e-2 and after < 1e-4
        many = [tok.encode(f"sort {i} {3 * i} {7 * i}") for i in range(8)]
        p = params(tok, n=4, temperature=1.2)
        a, b = one.generate(many, p), two.generate(many, p)
    finally:
        two.close()
    same = [x.token_ids == y.token_ids for x, y in zip(a, b)]
    diff = max(abs(u - v) for x, y, s in zip(a, b, same) if s for u, v in zip(x.logprobs, y.logprobs))
    print(f"TP=2 vs TP=1 engine: {sum(same)} of {len(same)} sequences identical, max |logprob diff| {diff:.3g}")
    assert sum(same) >= len(same) - 1 and diff < 1e-5
    assert all(c.routed_experts is None for c in a + b)  # a dense model, no routing replay
    assert len({tuple(c.token_ids) for c in a}) > 20  # varied samples
