"""The embedded rollout engine and policy backend on a real tiny Qwen2: logprob agreement, sampling,
weight sync, and micro-batch invariance of the update."""

import copy

import pytest
import torch
from transformers import AutoTokenizer

from nemo_prorl.policy import POLICY_BACKENDS
from nemo_prorl.rollout import ROLLOUT_ENGINES, SamplingParams
from nemo_prorl.rollout.torch_engine import top_p_filter
from nemo_prorl.trainer.batching import build_batch
from nemo_prorl.policy.base import LazyWeight
from nemo_prorl.weight_sync import sync_weights
from nemo_prorl.weight_sync.buffer import iter_buckets, pack, packed_size


@pytest.fixture()
def parts(tiny_cfg, tiny_model_dir):
    cfg, _ = tiny_cfg
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = POLICY_BACKENDS.get("hf")(cfg, tiny_model_dir)
    engine = ROLLOUT_ENGINES.get("torch")(cfg, tiny_model_dir)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                                  tokenize=False)) for c in ("reverse 123", "sort 98765")]
    return cfg, tok, policy, engine, prompts


def params(tok, **kw):
    base = dict(n=4, temperature=1.0, top_p=1.0, max_tokens=10, stop_token_ids=(tok.eos_token_id,), seed=3)
    return SamplingParams(**{**base, **kw})


def test_engine_logprobs_match_policy(parts):
    cfg, tok, policy, engine, prompts = parts
    comps = engine.generate(prompts, params(tok, temperature=0.7))
    assert [c.prompt_index for c in comps] == [0, 0, 0, 0, 1, 1, 1, 1]
    batch = build_batch(prompts, comps, tok.pad_token_id)
    lp = policy.logprobs(batch, temperature=0.7)
    err = ((lp - batch["rollout_logprobs"]).abs() * batch["response_mask"]).max().item()
    assert err < 1e-4, err
    assert (lp * (1 - batch["response_mask"])).abs().sum() == 0


def test_a_prompts_samples_do_not_depend_on_its_batch(parts):
    """Batch invariance (what lets several engines split a step): a prompt's samples are the same whether
    it is decoded with the other prompt in one chunk (max_num_seqs=256), in chunks of its own (4, 6: one
    prompt each), or alone (with its seed), and its samples share one prefill."""
    from nemo_prorl.rollout.base import prompt_seed

    _, tok, _, engine, prompts = parts
    prompts = prompts + [prompts[0][:-3]]  # a third prompt, in the same length bucket as the first
    runs = []
    for size in (256, 6, 4):
        engine.max_num_seqs = size
        runs.append([(c.prompt_index, c.token_ids, c.logprobs) for c in engine.generate(prompts, params(tok))])
    engine.max_num_seqs = 256
    alone = engine.generate(prompts[2:], params(tok), seeds=[prompt_seed(3, 2)])
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert [c.token_ids for c in alone] == [t for i, t, _ in runs[0] if i == 2]
    assert len({tuple(t) for _, t, _ in runs[0]}) > 2  # real sampling, not one repeated answer


def test_length_grouped_micro_batches_cut_padding_and_keep_row_order(parts):
    from nemo_prorl.policy.hf import by_length

    cfg, tok, policy, engine, prompts = parts
    comps = engine.generate(prompts + [prompts[0][:5]], params(tok, temperature=1.5))
    batch = build_batch(prompts + [prompts[0][:5]], comps, tok.pad_token_id)
    mixed = torch.tensor([0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])  # rows of short and long prompts interleaved
    batch = {k: v[mixed] for k, v in batch.items()}
    R = batch["response_mask"].shape[1]
    groups = by_length(batch, 4)
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(12))

    def width(mb):  # the columns trimmed_forward keeps: longest prompt + longest response of the micro-batch
        return int(mb["attention_mask"][:, :-R].sum(1).max() + mb["response_mask"].sum(1).max())

    grouped = sum(len(rows) * width(mb) for rows, mb in groups)
    in_order = sum(4 * width({k: v[i : i + 4] for k, v in batch.items()}) for i in range(0, 12, 4))
    assert grouped < in_order
    ref = None
    for size in (1, 3, 16):
        policy.cfg.policy.logprob_micro_batch_size = size
        lp = policy.logprobs(batch, temperature=1.5)
        ref = lp if ref is None else ref
        torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref * batch["response_mask"], batch["rollout_logprobs"], rtol=0, atol=1e-4)


def test_generation_is_seeded_and_stops(parts):
    _, tok, _, engine, prompts = parts
    a = engine.generate(prompts, params(tok))
    b = engine.generate(prompts, params(tok))
    c = engine.generate(prompts, params(tok, seed=4))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    for comp in a:
        stopped = comp.token_ids[-1] == tok.eos_token_id
        assert comp.finish_reason == ("stop" if stopped else "length")
        assert tok.eos_token_id not in comp.token_ids[:-1]
        assert len(comp.token_ids) <= 10 and len(comp.logprobs) == len(comp.token_ids)
    short = engine.generate(prompts, params(tok, max_tokens=1, temperature=50.0))
    assert all(len(x.token_ids) == 1 for x in short)
    assert any(x.finish_reason == "length" for x in short)


def test_stop_strings_end_the_response(parts):
    _, tok, _, engine, prompts = parts
    comps = engine.generate(prompts, params(tok, n=8, stop=("2",), temperature=1.5))
    hits = 0
    for c in comps:
        if "2" in tok.decode(c.token_ids):
            # the response ends with the token that completed the stop string, and not before it
            assert tok.decode(c.token_ids).endswith("2") and "2" not in tok.decode(c.token_ids[:-1])
            assert c.finish_reason == "stop"
            hits += 1
    assert hits > 0
    free = engine.generate(prompts, params(tok, n=8, temperature=1.5))
    assert any("2" in tok.decode(c.token_ids[:-1]) for c in free)  # without the stop string, "2" goes on


def test_top_p_filter_golden():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_iter_buckets_bounds_and_keeps_modules_together():
    # float32 sizes 64, 64, 192, 64, 448, 64 bytes once aligned to 64
    sizes = {"a.w0": 10, "a.w1": 16, "m.attn.q.weight": 40, "m.attn.k.weight": 10, "big.w": 100, "b.w5": 1}
    ws = [LazyWeight(n, (torch.zeros(k),)) for n, k in sizes.items()]
    buckets = list(iter_buckets(ws, bucket_bytes=256))
    # q and k share a module and fit together (256 bytes); the 448-byte tensor travels alone
    assert [[w.name for w in b] for b in buckets] == [["a.w0", "a.w1"], ["m.attn.q.weight", "m.attn.k.weight"],
                                                      ["big.w"], ["b.w5"]]
    assert [w.name for b in buckets for w in b] == list(sizes)
    assert all(packed_size(b) <= 256 for b in buckets if len(b) > 1)
    # sizes are counted in the engine's dtype: in bfloat16 more fits in a bucket
    assert len(list(iter_buckets(ws, bucket_bytes=384))) == 3
    assert len(list(iter_buckets(ws, bucket_bytes=384, dtype=torch.bfloat16))) == 2


def test_pack_builds_weights_in_place_at_aligned_offsets():
    a, b = torch.randn(3, 5), torch.randn(7, 5)
    ws = [LazyWeight("x.w", (a, b)), LazyWeight("y.w", (torch.randn(4, 3), torch.randn(4, 2)), dim=1)]
    buf = torch.zeros(packed_size(ws, torch.bfloat16), dtype=torch.uint8)
    out = pack(ws, buf, torch.bfloat16)
    assert [n for n, _ in out] == ["x.w", "y.w"]
    assert out[0][1].data_ptr() == buf.data_ptr() and (out[1][1].data_ptr() - buf.data_ptr()) % 64 == 0
    assert torch.equal(out[0][1], torch.cat([a, b]).bfloat16())
    assert torch.equal(out[1][1], torch.cat(ws[1].parts, dim=1).bfloat16())
    with pytest.raises(ValueError, match="too small for y.w"):
        pack(ws, buf[:100], torch.bfloat16)


def test_weight_sync_makes_engine_follow_the_policy(parts):
    cfg, tok, policy, engine, prompts = parts
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = engine.generate(prompts, params(tok, temperature=0.7))
    stats = sync_weights(policy, engine, bucket_mb=0.05)
    assert stats.num_buckets > 1 and stats.num_tensors == len(policy.model.state_dict())
    after = engine.generate(prompts, params(tok, temperature=0.7))
    batch = build_batch(prompts, after, tok.pad_token_id)
    err = ((policy.logprobs(batch, temperature=0.7) - batch["rollout_logprobs"]).abs() * batch["response_mask"]).max()
    assert err < 1e-4
    stale = build_batch(prompts, before, tok.pad_token_id)
    err_stale = ((policy.logprobs(stale, temperature=0.7) - stale["rollout_logprobs"]).abs() * stale["response_mask"]).max()
    assert err_stale > 1e-3  # the check above can fail: without the sync the engine disagrees


def test_engine_rejects_unknown_or_misshaped_weights(parts):
    _, _, _, engine, _ = parts
    with pytest.raises(KeyError, match="no weight named 'nope'"):
        engine.load_weights([("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.norm.weight"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


def _loss_fn(mb_all):
    from nemo_prorl.algo.loss import policy_loss

    n_tok = mb_all["response_mask"].sum()

    def fn(logp, ent, mb):
        return policy_loss(logp, mb["old_logprobs"], mb["advantages"], mb["response_mask"], clip_eps_low=0.2,
                           clip_eps_high=0.4, global_num_tokens=n_tok, global_num_seqs=8.0, horizon=10,
                           entropy=ent)
    return fn


def test_update_does_not_depend_on_micro_batch_size(parts, tiny_model_dir):
    cfg, tok, policy, engine, prompts = parts
    comps = engine.generate(prompts, params(tok))
    batch = build_batch(prompts, comps, tok.pad_token_id)
    batch["old_logprobs"] = policy.logprobs(batch, temperature=1.0)
    batch["advantages"] = torch.linspace(-1, 1, len(comps))
    results = []
    for mbs in (8, 3, 1):
        c = copy.deepcopy(cfg)
        c.policy.micro_batch_size = mbs
        p = POLICY_BACKENDS.get("hf")(c, tiny_model_dir)
        m = p.train_minibatch(batch, _loss_fn(batch), temperature=1.0)
        results.append((m, {k: v.clone() for k, v in p.model.state_dict().items()}))
    (m0, w0) = results[0]
    assert m0["update_skipped"] == 0.0 and m0["grad_norm"] > 0
    for m, w in results[1:]:
        assert m["loss"] == pytest.approx(m0["loss"], abs=1e-6)
        assert m["clip_frac"] == pytest.approx(m0["clip_frac"], abs=1e-6)
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], atol=2e-6, rtol=0)


def test_update_moves_logprobs_along_the_advantage(parts):
    cfg, tok, policy, engine, prompts = parts
    comps = engine.generate(prompts, params(tok))
    batch = build_batch(prompts, comps, tok.pad_token_id)
    batch["old_logprobs"] = policy.logprobs(batch, temperature=1.0)
    adv = torch.tensor([1.0, -1.0] * 4)
    batch["advantages"] = adv
    seq = lambda: (policy.logprobs(batch, temperature=1.0) * batch["response_mask"]).sum(1)  # noqa: E731
    before = seq()
    policy.train_minibatch(batch, _loss_fn(batch), temperature=1.0)
    delta = seq() - before
    assert (delta * adv).sum() > 0  # positive-advantage responses became likelier relative to the others


def test_reference_reset_copies_policy(parts):
    cfg, tok, policy, engine, prompts = parts
    batch = build_batch(prompts, engine.generate(prompts, params(tok)), tok.pad_token_id)
    with torch.no_grad():
        next(policy.model.parameters()).add_(0.1)
    assert not torch.equal(policy.logprobs(batch, temperature=1.0), policy.logprobs(batch, temperature=1.0, reference=True))
    policy.reset_reference()
    assert torch.equal(policy.logprobs(batch, temperature=1.0), policy.logprobs(batch, temperature=1.0, reference=True))


def test_entropy_bonus_gradient_is_the_entropys_autograd(parts, tiny_model_dir):
    """train_minibatch with entropy_coef=c moves the weights by the gradient of (pg loss - c * token-mean
    entropy): the difference to c=0 is -c times autograd of the entropy term, computed here independently."""
    import functools

    from nemo_prorl.algo.loss import entropy_from_logits
    from nemo_prorl.trainer.grpo import microbatch_loss

    cfg, tok, policy, engine, prompts = parts
    batch = build_batch(prompts, engine.generate(prompts, params(tok)), tok.pad_token_id)
    batch["old_logprobs"] = policy.logprobs(batch, temperature=1.2)
    batch["advantages"] = torch.linspace(-1, 1, 8)
    n_tok = batch["response_mask"].sum()

    def grads(coef):
        c = copy.deepcopy(cfg)
        c.algo.entropy_coef = coef
        c.policy.optim.lr, c.policy.optim.grad_clip, c.policy.micro_batch_size = 0.0, 1e9, 3
        p = POLICY_BACKENDS.get("hf")(c, tiny_model_dir)
        loss = functools.partial(microbatch_loss, clip_eps_low=0.2, clip_eps_high=0.4, global_num_tokens=n_tok,
                                 global_num_seqs=8.0, horizon=10, entropy_coef=coef)
        m = p.train_minibatch(batch, loss, temperature=1.2)
        return m, {n: q.grad.clone() for n, q in p.model.named_parameters()}, p.model

    m0, g0, _ = grads(0.0)
    m1, g1, model = grads(0.5)
    # the entropy term by hand: one forward over the whole batch, entropy of the response positions
    ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    R = rm.shape[1]
    logits = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    ent = entropy_from_logits(logits[:, -R - 1 : -1].float() / 1.2)
    term = (ent * rm).sum() / n_tok
    assert m1["entropy"] == pytest.approx(float(term.detach()), abs=1e-6) == pytest.approx(m0["entropy"], abs=1e-6)
    expected = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(term, list(model.parameters()))))
    diff = max((g1[n] - g0[n] + 0.5 * expected[n]).abs().max().item() for n in expected)
    scale = max(expected[n].abs().max().item() for n in expected)
    assert scale > 1e-3 and diff < 1e-4 * scale, (diff, scale)  # was g1 == g0: the bonus moved nothing


def test_generation_uses_the_current_cache_api(parts):
    """transformers deprecated `past_key_values` in the models' forward (removed in 5.40): the engine
    passes its cache under the current name, so decoding warns about nothing."""
    import warnings

    _, tok, _, engine, prompts = parts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comps = engine.generate(prompts, params(tok, max_tokens=4))
    assert len(comps) == 8 and all(c.token_ids for c in comps)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
