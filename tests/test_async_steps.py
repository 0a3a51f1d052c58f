"""Asynchronous steps (algo.async.max_staleness = k): the producer's buffer and its staleness rule, the
trained samples' version lags, the importance weights they get, and resume after an engine dies mid-stream.

The runs are the real trainer (hf policy, torch engine actors on a private loopback Ray cluster)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from nemo_prorl.config import load_config
from nemo_prorl.rollout.base import SamplingParams
from nemo_prorl.rollout.pool import RolloutEngineError
from nemo_prorl.rollout.torch_engine import TorchRolloutEngine
from nemo_prorl.train import build_trainer, run_training
from nemo_prorl.trainer import grpo
from nemo_prorl.trainer.producer import RolloutProducer, Scores
from tests.checks import assert_every_step_updated
from tests.conftest import TINY_OVERRIDES
from tests.test_trainer_e2e import mixed_rewards  # noqa: F401  (fixture)


def _args(model_dir: Path, out: Path, k: int, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"model.path={model_dir}", f"trainer.output_dir={out}", f"algo.async.max_staleness={k}",
            "trainer.tensorboard=false", "trainer.plot=false", "validation.every_n_steps=0",
            "algo.rollout_correction.mode=tis", "cluster.num_threads=1", *extra]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl") if "reward/mean" in line]


# ---------------------------------------------------------------------------------------------- the buffer
class _Stream:
    """A data source of numbered prompts (the producer only draws, and reads the state)."""

    def __init__(self) -> None:
        self.position = 0

    def next_prompts(self, num: int) -> list:
        from nemo_prorl.data.records import PromptRecord

        out = [PromptRecord(uid=str(self.position + i), messages=({"role": "user", "content": str(self.position + i)},),
                            ground_truth="", domain="test", reward="exact") for i in range(num)]
        self.position += num
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}


def _producer(engine: TorchRolloutEngine, tokenizer, *, capacity: int, request: int) -> RolloutProducer:
    def encode(records):
        ids = [tokenizer(r.messages[0]["content"])["input_ids"] or [1] for r in records]
        return list(records), ids, 0

    def score(records, completions):
        n = len(completions)
        # rewards that differ inside every group (a learning signal), by the sample's place
        r = torch.tensor([float(i % 2) for i in range(n)])
        return Scores(rewards=r, correct=r > 0, lengths=torch.tensor([len(c.token_ids) for c in completions]),
                      truncated=torch.zeros(n, dtype=torch.bool), statuses=["ok"] * n, domains=["test"] * n,
                      info=[{}] * n), r

    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=4, stop_token_ids=(), seed=0)
    return RolloutProducer(engine=engine, source=_Stream(), params=params, encode=encode, score=score,
                           capacity=capacity, request_prompts=request, first_seq=0, seed=lambda seq: seq)


def test_groups_come_in_stream_order_and_stale_ones_are_dropped(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = TorchRolloutEngine(tiny_model_dir, device="cpu", dtype="float32", max_num_seqs=8, pad_token_id=0)
    producer = _producer(engine, tok, capacity=4, request=2).start()
    try:
        first = producer.take(policy_version=0, max_staleness=1, need=2, budget=4, has_signal=lambda r: True)
        assert [g.seq for g in first.kept] == [0, 1] and first.dropped_stale == 0
        assert [g.data_state["position"] for g in first.kept] == [1, 2]  # the source's state after each prompt
        assert all(c.versions == [0] * len(c.token_ids) for g in first.kept for c in g.completions)
        deadline = time.monotonic() + 300
        while producer.occupancy()[0] < 2:  # groups 2 and 3, generated ahead at version 0, are waiting
            assert time.monotonic() < deadline, "the producer did not refill its buffer"
            time.sleep(0.01)
        # the engine's weights are now version 5: what was generated at version 0 is 2 versions behind
        # the policy at version 2, more than max_staleness 1: dropped, counted, never kept
        engine.begin_weight_update()
        engine.finish_weight_update(version=5)
        late = producer.take(policy_version=2, max_staleness=1, need=2, budget=6, has_signal=lambda r: True)
        old = [g for g in late.examined if g.oldest_version == 0]
        assert late.dropped_stale == len(old) >= 2 and [g.seq for g in old[:2]] == [2, 3]
        assert all(g.oldest_version == 5 for g in late.kept) and len(late.kept) == 2
        seqs = [g.seq for g in first.examined + late.examined]
        assert seqs == list(range(len(seqs)))  # in order, none skipped, none twice
        ready, in_flight = producer.occupancy()
        assert ready + in_flight <= 4  # the bound: drawn and not yet taken
    finally:
        producer.stop()


def test_an_engine_failure_reaches_the_trainer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = TorchRolloutEngine(tiny_model_dir, device="cpu", dtype="float32", max_num_seqs=8, pad_token_id=0)

    def broken(*a, **k):
        raise RolloutEngineError("torch engine 0 on node 0 died during generate", role="torch engine", index=0)

    engine.generate = broken
    producer = _producer(engine, tok, capacity=2, request=2).start()
    try:
        with pytest.raises(RolloutEngineError, match="died during generate"):
            producer.take(policy_version=0, max_staleness=1, need=2, budget=2, has_signal=lambda r: True)
    finally:
        producer.stop()


# ---------------------------------------------------------------------------------------------- the trainer
@pytest.fixture()
def recorded(monkeypatch):
    """Every step's kept groups and the proximal/behaviour log-ratios its update saw."""
    log: list[dict] = []
    take, update = grpo.ProRLTrainer.take_groups, grpo.ProRLTrainer.update

    def take_groups(self, step, timer):
        kept, metrics = take(self, step, timer)
        log.append({"step": step, "seqs": list(kept.seqs), "lags": kept.versions_behind.clone(),
                    "consumed": self.prompts_consumed, "prompt_ids": dict(zip(kept.seqs, kept.prompt_ids))})
        return kept, metrics

    def update_(self, batch, plan):
        # before the update the policy is the proximal one: log w = log pi_prox - log pi_behaviour
        prox = self.policy.logprobs(batch, temperature=self.cfg.rollout.temperature)
        mask = batch["response_mask"].bool()
        log[-1]["log_w"] = [(prox[i] - batch["rollout_logprobs"][i])[mask[i]].abs().max().item()
                            for i in range(len(prox))]
        return update(self, batch, plan)

    monkeypatch.setattr(grpo.ProRLTrainer, "take_groups", take_groups)
    monkeypatch.setattr(grpo.ProRLTrainer, "update", update_)
    return log


@pytest.mark.parametrize("k", [1, 2])
def test_trained_samples_are_at_most_k_versions_behind(tiny_model_dir, tmp_path, k, recorded, mixed_rewards):
    cfg, resolved = load_config(_args(tiny_model_dir, tmp_path / "run", k, "trainer.num_steps=5",
                                      "trainer.checkpoint_every_n_steps=5"))
    run_training(cfg, resolved)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert_every_step_updated(rows)
    lags = torch.cat([s["lags"] for s in recorded])
    assert lags.max() <= k and lags.min() >= 0  # every trained sample, not a mean
    assert lags.max() >= 1  # the engines ran ahead of the trainer: the overlap happened
    for s, row in zip(recorded, rows):
        assert row["async/version_lag_max"] == float(s["lags"].max())
        for lag, log_w in zip(s["lags"].tolist(), s["log_w"]):
            if lag > 0:  # an older policy sampled it: the importance weight pi_prox / pi_behaviour is not 1
                assert log_w > 1e-4, (s["step"], lag, log_w)
            else:  # the same weights: only the engine's numerical mismatch
                assert log_w < 1e-4, (s["step"], lag, log_w)
    assert all(r["actor/rollout_is/mean_weight"] != 1.0 for r in rows if r["async/version_lag_max"] > 0)
    for key in ("async/buffer_groups", "async/dropped_stale_groups", "async/engine_idle_frac",
                "async/trainer_idle_frac", "async/multi_version_tokens", "async/version_lag_mean"):
        assert all(key in r for r in rows), key
    assert rows[-1]["data/skipped_rows"] == 0


def test_engine_killed_mid_stream_then_resume_takes_every_prompt_once(tiny_model_dir, tmp_path, recorded,
                                                                      mixed_rewards, monkeypatch):
    import ray

    out = tmp_path / "run"
    args = _args(tiny_model_dir, out, 1, "trainer.num_steps=7", "trainer.checkpoint_every_n_steps=2",
                 "trainer.keep_last_checkpoints=10")
    run_step = grpo.ProRLTrainer.run_step

    def killing(self, timer, logger):
        metrics = run_step(self, timer, logger)
        if self.step == 3:  # the producer is generating the next steps' groups: its engine dies
            ray.kill(self.engine.group.actors[0], no_restart=True)
        return metrics

    monkeypatch.setattr(grpo.ProRLTrainer, "run_step", killing)
    cfg, resolved = load_config(args)
    with pytest.raises(RolloutEngineError, match=r"torch engine 0 .*died"):
        run_training(cfg, resolved)
    first = list(recorded)
    monkeypatch.setattr(grpo.ProRLTrainer, "run_step", run_step)
    recorded.clear()
    cfg, resolved = load_config([*args, "resume=auto"])
    trainer = build_trainer(cfg, resolved)
    resumed_at = trainer.step
    try:
        trainer.fit()
    finally:
        trainer.engine.close()
        trainer.policy.close()
    assert resumed_at == 2  # the sync of step 4 meets the dead engine, so step 4 never checkpoints
    before = [s for s in first if s["step"] <= resumed_at]
    # every prompt of the stream is taken by exactly one step: the resumed run starts where the
    # checkpointed steps stopped taking, and draws the prompts that were in flight again
    start = before[-1]["consumed"]
    assert recorded[0]["step"] == resumed_at + 1
    ends = [start] + [s["consumed"] for s in recorded]
    assert all(b > a for a, b in zip(ends, ends[1:]))
    trained = [q for s in before + recorded for q in s["seqs"]]
    assert len(trained) == len(set(trained))
    assert all(q < start for s in before for q in s["seqs"])
    assert all(start <= q < recorded[-1]["consumed"] for s in recorded for q in s["seqs"])
    # the prompts the dead run had drawn ahead were drawn again, the same ones
    again = {q: ids for s in first if s["step"] > resumed_at for q, ids in s["prompt_ids"].items()}
    redrawn = {q: ids for s in recorded for q, ids in s["prompt_ids"].items() if q in again}
    assert redrawn and all(again[q] == ids for q, ids in redrawn.items())
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 8))


def test_colocated_engines_with_async_steps_are_refused(tiny_model_dir, tmp_path):
    from nemo_prorl.config.loader import ConfigError

    with pytest.raises(ConfigError, match="algo.async.max_staleness"):
        load_config(_args(tiny_model_dir, tmp_path, 1, "policy=megatron"))


def test_megatron_with_rollout_devices_inside_the_node(tiny_model_dir, tmp_path, recorded, mixed_rewards):
    """policy=megatron on slot 0 and a torch engine on slot 1 of one machine (cluster.rollout_devices_per_node):
    asynchronous steps with the node-local weight sync."""
    cfg, resolved = load_config(_args(tiny_model_dir, tmp_path / "run", 1, "policy=megatron",
                                      "cluster.rollout_devices_per_node=1", "trainer.num_steps=3",
                                      "trainer.checkpoint_every_n_steps=3"))
    from nemo_prorl.cluster import plan_from_config

    plan = plan_from_config(cfg)
    assert plan.mode == "split-node" and [(r.node, r.device) for r in plan.ranks] == [(0, 0)]
    assert [(e.node, e.devices) for e in plan.engines] == [(0, (1,))]
    run_training(cfg, resolved)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_every_step_updated(rows)
    assert all(r["sync/megabytes"] > 0 and r["sync/cross_node_megabytes"] == 0 for r in rows)
    lags = torch.cat([s["lags"] for s in recorded])
    assert 0 <= lags.min() and lags.max() <= 1


def test_steps_without_groups_are_no_version(tiny_model_dir, tmp_path, recorded, mixed_rewards, monkeypatch):
    """Steps whose groups are all uniform (DAPO keeps none) take no update and sync nothing: the policy's
    version stays, so the groups generated meanwhile are not counted as stale (otherwise k + 1 such steps in
    a row would lock the run out: every later group dropped, no update ever again)."""
    from nemo_prorl.rewards import REWARDS, RewardResult
    from tests.test_trainer_e2e import EvenLength

    scored = [0]
    uniform_rows = 2 * 12 * 4  # two steps' budget: 12 prompts (3 rounds of 4) x 4 samples

    class UniformFirst(EvenLength):  # the scorer scores in stream order: the first rows are all 0
        def score(self, inp):
            scored[0] += 1
            return super().score(inp) if scored[0] > uniform_rows else RewardResult(0.0, correct=False)

    if "test_uniform_first" not in REWARDS:
        REWARDS.register("test_uniform_first")(lambda cfg=None: UniformFirst())
    from nemo_prorl.data import synthetic

    for task in ("reverse", "sort"):
        monkeypatch.setitem(synthetic.TASK_REWARDS, task, "test_uniform_first")
    cfg, resolved = load_config(_args(tiny_model_dir, tmp_path / "run", 1, "trainer.num_steps=5",
                                      "trainer.checkpoint_every_n_steps=5", "reward.overlong.enabled=false"))
    run_training(cfg, resolved)
    rows = {r["step"]: r for r in _rows(tmp_path / "run")}
    assert rows[1]["filter/kept_groups"] == rows[2]["filter/kept_groups"] == 0
    assert "actor/loss" not in rows[1] and "actor/loss" not in rows[2]
    trained = [s for s in recorded if len(s["seqs"])]
    assert [s["step"] for s in trained] == [3, 4, 5]
    assert all(rows[s]["async/dropped_stale_groups"] == 0 for s in (3, 4, 5))
    assert_every_step_updated([rows[s] for s in (3, 4, 5)])
    lags = torch.cat([s["lags"] for s in trained])
    assert lags.max() <= 1
