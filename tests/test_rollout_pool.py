"""Data-parallel rollout engines (rollout/pool.py): how a step's prompts are dealt out, which ranks feed
which engines in the node-local weight sync (weight_sync/sync.py transfer_plan), and torch engines as Ray actors
that generate exactly what one engine does for any number of engines."""

from __future__ import annotations

import pytest

from nemo_prorl.config import load_config
from nemo_prorl.rollout import ROLLOUT_ENGINES, SamplingParams
from nemo_prorl.rollout.base import prompt_seed, split_prompts
from nemo_prorl.weight_sync.sync import transfer_plan
from tests.conftest import TINY_OVERRIDES


def test_prompts_are_dealt_whole_balanced_by_count_and_length():
    lengths = [10, 50, 20, 40, 30, 60, 5]
    parts = split_prompts(lengths, 3)
    # snake order: 60, 50, 40 to parts 0, 1, 2; 30, 20, 10 to parts 2, 1, 0; 5 to part 0
    assert parts == [[0, 5, 6], [1, 2], [3, 4]]
    assert sorted(i for p in parts for i in p) == list(range(7))
    assert [sum(lengths[i] for i in p) for p in parts] == [75, 70, 70]
    assert split_prompts([7, 7], 3) == [[0], [1], []]  # fewer prompts than engines: some get none
    assert split_prompts([], 2) == [[], []]
    assert split_prompts([3, 1, 2], 1) == [[0, 1, 2]]


def test_prompt_seeds_are_spread_and_fixed():
    assert prompt_seed(5, 0) == 5_000_015 and prompt_seed(5, 1) == 5_065_552
    assert len({prompt_seed(42, i) + k for i in range(256) for k in range(16)}) == 256 * 16  # no shared stream


# (stage, tp) shards held by each rank; rank r at rank_sites[r] = (node, device); an engine's buffer site is
# (node, its GPU) where a rank shares that GPU, else (node, -1): the node's host shared memory (always on CPU)
def test_transfer_plan_dp_over_nodes_moves_nothing_across():
    held, sites = [[(0, 0)], [(0, 0)], [(0, 0)], [(0, 0)]], [(0, 0), (0, 1), (1, 0), (1, 1)]  # TP=1 DP=4, 2 x 2
    leaders, transfers = transfer_plan(held, sites, [(0, -1), (0, -1), (1, -1), (1, -1)])  # CPU: a buffer per node
    assert leaders == {(0, -1): 0, (1, -1): 2} and transfers == []
    leaders, transfers = transfer_plan(held, sites, sites)  # GPU: each engine's own rank fills its buffer
    assert leaders == {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3} and transfers == []


def test_transfer_plan_tp_inside_a_node_stays_on_the_node():
    held, sites = [[(0, 0)], [(0, 1)], [(0, 0)], [(0, 1)]], [(0, 0), (0, 1), (1, 0), (1, 1)]  # a TP=2 group per node
    leaders, transfers = transfer_plan(held, sites, [(0, -1), (1, -1)])
    assert leaders == {(0, -1): 0, (1, -1): 2} and transfers == [(1, 0, (0, 1)), (3, 2, (0, 1))]
    leaders, transfers = transfer_plan(held, sites, sites)  # GPU: each leader takes its TP peer's half, locally
    assert transfers == [(1, 0, (0, 1)), (0, 1, (0, 0)), (3, 2, (0, 1)), (2, 3, (0, 0))]


def test_transfer_plan_crosses_nodes_only_for_shards_the_node_lacks():
    # TP=2 over two CPU nodes of one slot each: each node has half of every layer
    leaders, transfers = transfer_plan([[(0, 0)], [(0, 1)]], [(0, 0), (1, 0)], [(0, -1), (1, -1)])
    assert leaders == {(0, -1): 0, (1, -1): 1} and transfers == [(1, 0, (0, 1)), (0, 1, (0, 0))]
    # PP=2 x DP=2, pipeline stages on different nodes: the missing stage comes from different replicas
    held = [[(0, 0)], [(1, 0)], [(0, 0)], [(1, 0)]]
    leaders, transfers = transfer_plan(held, [(0, 0), (1, 0), (0, 1), (1, 1)], [(0, -1), (1, -1)])
    assert leaders == {(0, -1): 0, (1, -1): 1} and transfers == [(1, 0, (1, 0)), (2, 1, (0, 0))]


def test_transfer_plan_engines_on_gpus_without_a_rank_use_the_nodes_host_buffer():
    leaders, transfers = transfer_plan([[(0, 0)], [(0, 0)]], [(0, 0), (0, 1)], [(0, 0), (0, 1), (0, -1), (0, -1)])
    assert leaders == {(0, -1): 0, (0, 0): 0, (0, 1): 1} and transfers == []


def test_transfer_plan_needs_a_rank_on_every_engine_node():
    with pytest.raises(ValueError, match="node 1 hosts an engine but no Megatron rank"):
        transfer_plan([[(0, 0)]], [(0, 0)], [(0, -1), (1, -1)])


def _params(tok, **kw):
    base = dict(n=4, temperature=1.2, top_p=1.0, max_tokens=12, stop_token_ids=(tok.eos_token_id,), seed=5)
    return SamplingParams(**{**base, **kw})


def test_torch_engines_as_actors_generate_what_one_engine_does(tiny_model_dir):
    """1, 2 and 3 torch engines (the last two as Ray actors) give the same completions: token ids and
    logprobs identical, in prompt order. The torch engine is batch-invariant (rows padded to their own
    length bucket, a random stream per prompt), so where a prompt lands changes nothing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok.encode(f"What is {i} + {3 * i}?" + " and" * (i % 5)) for i in range(11)]
    out = {}
    for k in (1, 2, 3):
        cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", f"rollout.num_engines={k}"])
        engine = ROLLOUT_ENGINES.get("torch")(cfg, tiny_model_dir)
        try:
            assert (type(engine).__name__ == "TorchRolloutEngine") == (k == 1)
            if k > 1:
                assert len(engine.group.actors) == k
            out[k] = [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason, c.versions) for c in
                      engine.generate(prompts, _params(tok))]
            if k == 3:  # the seed matters, and so does each prompt's own seed
                again = engine.generate(prompts, _params(tok, seed=6))
                assert [c.token_ids for c in again] != [x[1] for x in out[3]]
                alone = engine.generate(prompts[4:5], _params(tok), seeds=[prompt_seed(5, 4)])
                assert [c.token_ids for c in alone] == [x[1] for x in out[3] if x[0] == 4]
        finally:
            engine.close()
    assert [x[0] for x in out[1]] == [i for i in range(11) for _ in range(4)]
    assert len({tuple(x[1]) for x in out[1]}) > 20  # varied samples, not one answer
    assert all(x[4] == [0] * len(x[1]) for x in out[1])  # every token from the weights of version 0
    assert out[2] == out[1] and out[3] == out[1]
