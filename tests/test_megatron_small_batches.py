"""The Megatron backend (real megatron-core on CPU over gloo) where the transformers backend is the
reference: mini-batches with fewer rows than data-parallel ranks (a rank with no rows takes part in every
collective with an empty, fully masked micro-batch), and a model with tied embeddings split over two
pipeline stages (the first stage's embedding and the last stage's copy of it as the output layer)."""

import copy
import functools
import shutil

import megatron.core  # noqa: F401  a project dependency: fail, never skip, if it is missing
import pytest
import torch
from safetensors.torch import load_file

from nemo_prorl.config.loader import load_config
from nemo_prorl.policy import POLICY_BACKENDS
from tests.checks import assert_update_matches
from tests.conftest import TINY_OVERRIDES
from tests.test_megatron_policy import _batch_and_loss


@pytest.fixture(scope="module")
def small_setup(tiny_model_dir):
    """The parity setup of test_megatron_policy (Adam with eps=1: the weights compare the gradients), with
    an entropy bonus, so that the entropy's own backward runs on the empty micro-batches too."""
    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "policy.optim.eps=1.0",
                          "policy.optim.lr=0.1", "policy.optim.weight_decay=0.0", "policy.micro_batch_size=3",
                          "policy.megatron.micro_batch_tokens=48", "algo.entropy_coef=0.1"])
    batch, loss = _batch_and_loss(cfg, tiny_model_dir)
    return cfg, tiny_model_dir, batch, loss


def _rows(batch, loss, k: int, agg: str = "token-mean"):
    """The first k rows of `batch` as a mini-batch, and its loss (normalised by its own totals, as the
    trainer's loss_fn is), with the KL term and an entropy bonus."""
    sub = {key: v[:k] for key, v in batch.items()}
    fn = functools.partial(loss.func, **{**loss.keywords, "global_num_tokens": sub["response_mask"].sum(),
                                          "global_num_seqs": float(k), "loss_agg_mode": agg, "entropy_coef": 0.1})
    return sub, fn


def _megatron(cfg, model_dir, **overrides):
    c = copy.deepcopy(cfg)
    for key, v in overrides.items():
        setattr(c.policy.megatron, key, v)
    return POLICY_BACKENDS.get("megatron")(c, model_dir)


def _check_against_hf(policy, cfg, model_dir, sub, fn):
    """Logprobs (policy and reference), then one update, of the Megatron policy equal the transformers
    backend's on the same rows: every metric, the gradient norm and the updated weights."""
    hf = POLICY_BACKENDS.get("hf")(cfg, model_dir)
    lp = hf.logprobs(sub, temperature=1.0)
    torch.testing.assert_close(policy.logprobs(sub, temperature=1.0), lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(policy.logprobs(sub, temperature=1.0, reference=True),
                               hf.logprobs(sub, temperature=1.0, reference=True), atol=1e-5, rtol=0)
    expected = hf.train_minibatch(sub, fn, temperature=1.0)
    got = policy.train_minibatch(sub, fn, temperature=1.0)
    assert got["update_skipped"] == 0.0 and expected["update_skipped"] == 0.0
    # every metric, none diluted by the empty micro-batches of the ranks without rows
    assert set(got) == set(expected)
    for key, v in expected.items():
        assert got[key] == pytest.approx(v, abs=1e-6, rel=1e-5), key
    assert_update_matches(got, expected, dict(policy.named_weights()), hf.model.state_dict())


@pytest.fixture(scope="module")
def dp2(small_setup):
    """One DP=2 policy for every row count, put back to its starting weights and optimizer state before
    each case."""
    cfg, model_dir, *_ = small_setup
    policy = _megatron(cfg, model_dir, data_parallel_size=2)
    start = policy.state_dict()
    try:
        yield policy, start
    finally:
        policy.close()


@pytest.mark.parametrize("k,agg", [(1, "token-mean"), (2, "token-mean"), (3, "token-mean"), (4, "token-mean"),
                                   (1, "seq-mean-token-mean")])
def test_dp2_mini_batches_of_1_to_4_rows_match_transformers(small_setup, dp2, k, agg):
    """Rows 1 .. 2 x DP: with one row, DP rank 1 has none; with three, the ranks hold 2 and 1."""
    cfg, model_dir, batch, loss = small_setup
    policy, start = dp2
    policy.load_state_dict(start)
    sub, fn = _rows(batch, loss, k, agg)
    _check_against_hf(policy, cfg, model_dir, sub, fn)


@pytest.mark.parametrize("layout", ["dp2_pp2", "pp2_vp2"])
def test_one_row_under_pipeline_layouts(small_setup, tmp_path, layout):
    """dp2_pp2: the second replica's two stages run their schedule (forward, p2p, backward) on an empty
    micro-batch and still meet the first replica in the gradient reduction. pp2_vp2 (interleaved, a
    4-layer model): the schedule wants PP micro-batches of one shape, and one row fills only one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg, model_dir, batch, loss = small_setup
    sub, fn = _rows(batch, loss, 1)
    if layout == "dp2_pp2":
        overrides = dict(data_parallel_size=2, pipeline_parallel_size=2)
    else:
        overrides = dict(pipeline_parallel_size=2, virtual_pipeline_parallel_size=2)
        model_dir = tmp_path
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(vocab_size=cfg.model.tiny.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=64)).save_pretrained(model_dir)
        lp = POLICY_BACKENDS.get("hf")(cfg, model_dir).logprobs(sub, temperature=1.0)
        sub = dict(sub, old_logprobs=lp, ref_logprobs=lp - 0.05)  # this model's own sampling policy
    policy = _megatron(cfg, model_dir, **overrides)
    try:
        _check_against_hf(policy, cfg, model_dir, sub, fn)
    finally:
        policy.close()


# ---------------------------------------------------------------------------------------------- tied embeddings
@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its output layer tied to the input embedding (as small Qwen2.5 models are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tied")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    weights = load_file(tiny_model_dir / "model.safetensors")
    weights.pop("lm_head.weight")
    model.load_state_dict(weights, strict=False)
    model.save_pretrained(out)
    for f in tiny_model_dir.iterdir():  # the tokenizer
        if f.is_file() and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    return out


def _engine_gap(engine, hf, tok, prompts) -> float:
    """Largest gap between the engine's sampling logprobs and the hf policy's on the same tokens."""
    from nemo_prorl.rollout import SamplingParams
    from nemo_prorl.trainer.batching import build_batch

    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=8, stop_token_ids=(tok.eos_token_id,), seed=1)
    b = build_batch(prompts, engine.generate(prompts, params), tok.pad_token_id)
    return float(((hf.logprobs(b, temperature=1.0) - b["rollout_logprobs"]).abs() * b["response_mask"]).max())


def test_tied_embeddings_pp2_match_transformers_save_and_sync(small_setup, tied_model_dir, tmp_path):
    """PP=2 with tied embeddings: the last stage's output layer is a copy of the first stage's embedding,
    started from it and kept equal to it by the all-reduce of their gradients over the embedding group.
    Logprobs and an update equal the transformers backend's (which has one tensor for both); the saved HF
    folder and the weights synced into the engines (in-process, and two engine actors fed node-locally
    by the ranks) are the transformers backend's updated weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_prorl.rollout import ROLLOUT_ENGINES
    from nemo_prorl.weight_sync import sync_weights

    cfg, _, batch, loss = small_setup
    cfg = copy.deepcopy(cfg)
    cfg.model.path = str(tied_model_dir)
    hf = POLICY_BACKENDS.get("hf")(cfg, tied_model_dir)
    assert hf.model.lm_head.weight is hf.model.model.embed_tokens.weight
    lp = hf.logprobs(batch, temperature=1.0)
    batch = dict(batch, old_logprobs=lp, ref_logprobs=lp - 0.05)
    expected = hf.train_minibatch(batch, loss, temperature=1.0)
    hf_weights = {k: v for k, v in hf.model.state_dict().items() if k != "lm_head.weight"}  # the tie's alias
    tok = AutoTokenizer.from_pretrained(tied_model_dir)
    prompts = [tok.encode(f"count to {i}") for i in range(3)]
    policy = _megatron(cfg, tied_model_dir, pipeline_parallel_size=2)
    try:
        torch.testing.assert_close(policy.logprobs(batch, temperature=1.0), lp, atol=1e-5, rtol=0)
        got = policy.train_minibatch(batch, loss, temperature=1.0)
        assert_update_matches(got, expected, dict(policy.named_weights()), hf_weights)
        # the last stage's output layer moved with the embedding: the logprobs after the update agree too
        torch.testing.assert_close(policy.logprobs(batch, temperature=1.0), hf.logprobs(batch, temperature=1.0),
                                   atol=1e-5, rtol=0)
        policy.save(tmp_path / "megatron")
        hf.save(tmp_path / "hf")
        saved, ref = load_file(tmp_path / "megatron" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
        assert set(saved) == set(ref) and "lm_head.weight" not in saved
        assert max((saved[k] - ref[k]).abs().max().item() for k in ref) < 2e-6
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "megatron")
        assert back.lm_head.weight is back.model.embed_tokens.weight
        # the sync, through this process into an in-process engine: every weight the engine holds
        local = ROLLOUT_ENGINES.get("torch")(cfg, tied_model_dir)
        assert _engine_gap(local, hf, tok, prompts) > 1e-2  # the engine still has the starting weights
        sync_weights(policy, local, bucket_mb=0.05)
        engine_weights = local.model.state_dict()
        assert engine_weights["lm_head.weight"].data_ptr() == engine_weights["model.embed_tokens.weight"].data_ptr()
        assert max((engine_weights[k] - v).abs().max().item() for k, v in hf.model.state_dict().items()) < 2e-6
        # ... and node-locally from the ranks into two engine actors (the path of vLLM engines)
        pool_cfg = copy.deepcopy(cfg)
        pool_cfg.rollout.num_engines = 2
        pool = ROLLOUT_ENGINES.get("torch")(pool_cfg, tied_model_dir)
        try:
            assert _engine_gap(pool, hf, tok, prompts) > 1e-2
            sync_weights(policy, pool, bucket_mb=0.05)
            assert _engine_gap(pool, hf, tok, prompts) < 1e-4
        finally:
            pool.close()
        # the distributed checkpoint (the shared embedding's own gradient bucket) restores exactly
        (tmp_path / "ckpt").mkdir()
        policy.save_state(tmp_path / "ckpt")
        saved_weights = dict(policy.named_weights())
        after = policy.train_minibatch(batch, loss, temperature=1.0)
        policy.load_state(tmp_path / "ckpt")
        assert all(torch.equal(v, saved_weights[k]) for k, v in policy.named_weights())
        assert policy.train_minibatch(batch, loss, temperature=1.0) == after
    finally:
        policy.close()


def test_tied_conversion_round_trip_keeps_one_embedding(tied_model_dir, tmp_path):
    """`prorl convert` of a tied model over TP=2 x PP=2: the last stage gets the embedding as its output
    layer (megatron's copy of it), and back in HF form there is one tensor, as transformers saves it."""
    from transformers import AutoModelForCausalLM

    from nemo_prorl.policy.convert import hf_to_megatron_dir, megatron_to_hf_dir

    hf_to_megatron_dir(tied_model_dir, tmp_path / "meg", tp=2, pp=2)
    for t in range(2):
        first = torch.load(tmp_path / "meg" / "release" / f"mp_rank_{t:02d}_000" / "model_optim_rng.pt", weights_only=True)
        last = torch.load(tmp_path / "meg" / "release" / f"mp_rank_{t:02d}_001" / "model_optim_rng.pt", weights_only=True)
        assert torch.equal(last["model"]["output_layer.weight"], first["model"]["embedding.word_embeddings.weight"])
    megatron_to_hf_dir(tmp_path / "meg", tmp_path / "back")
    a, b = load_file(tied_model_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and "lm_head.weight" not in b
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert back.lm_head.weight is back.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------- other workers
def test_engines_and_reward_workers_take_empty_shares(tiny_model_dir):
    """The engine actors (EnginePool deals prompts with split_prompts) and the reward workers (NodeRewardSuite
    deals rows with split_rows) with fewer items than workers: one share per worker, some empty, every item
    dealt once; and an empty share is a valid call for the worker that gets it."""
    from transformers import AutoTokenizer

    from nemo_prorl.cluster.rewards import split_rows
    from nemo_prorl.rewards import RewardSuite
    from nemo_prorl.rollout import SamplingParams
    from nemo_prorl.rollout.base import split_prompts
    from nemo_prorl.rollout.torch_engine import TorchRolloutEngine

    for workers in (2, 3, 32):
        for n in (0, 1, workers - 1, workers + 1):
            parts = split_prompts([7 + i % 3 for i in range(n)], workers)
            assert len(parts) == workers and sorted(i for p in parts for i in p) == list(range(n))
            spans = split_rows(n, workers)
            assert len(spans) == workers and [i for a, b in spans for i in range(a, b)] == list(range(n))
    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}"])
    suite = RewardSuite(cfg.reward)
    try:
        assert suite.score_batch([], []) == []
    finally:
        suite.close()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = TorchRolloutEngine(tiny_model_dir, device="cpu", dtype=cfg.model.dtype, max_num_seqs=4,
                                pad_token_id=tok.pad_token_id, tokenizer=tok)
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=4, stop_token_ids=(tok.eos_token_id,), seed=1)
    assert engine.generate([], params) == []
