"""`reward.worker_timeout_s`: how long a node's reward worker may take for its share of a batch before it is
replaced (cluster/rewards.py). By default derived from the verifiers' own limits and the rows' share; a
hung (SIGSTOPped) worker is replaced within it, or sooner when it cannot answer a liveness check
(`reward.worker_liveness_timeout_s`), and its rows are scored again: the step does not stall."""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest

from nemo_prorl.config import load_config
from nemo_prorl.config.loader import ConfigError
from nemo_prorl.config.schema import RewardConfig
from tests.conftest import TINY_OVERRIDES
from tests.test_cluster_ray import _gone, two_nodes  # noqa: F401  (the module's two simulated nodes)


def test_the_derived_worker_timeout_covers_what_the_verifiers_may_take():
    from nemo_prorl.cluster.rewards import derived_worker_timeout

    r = RewardConfig()
    margin = derived_worker_timeout(r, [])
    assert margin > 0  # a fresh worker starts its verifier pools within it

    def extra(cfg: RewardConfig, names: list[str]) -> float:
        return derived_worker_timeout(cfg, names) - margin

    # never less than the rows' own limits, spread over each verifier's processes
    assert extra(r, ["math"] * 100) >= 100 * r.math.timeout_s / r.math.num_workers
    assert extra(r, ["stem"] * 100) >= 100 * r.math.timeout_s  # STEM expressions: one checker process
    assert extra(r, ["reasoning_gym"] * 100) >= 100 * r.reasoning_gym.timeout_s / r.reasoning_gym.num_workers
    assert extra(r, ["code"] * 100) >= 100 * r.sandbox.total_timeout_s / r.sandbox.num_workers
    # proportional to the share, and to each verifier's own limit
    assert extra(r, ["math"] * 200) == pytest.approx(2 * extra(r, ["math"] * 100))
    slow = RewardConfig()
    slow.math.timeout_s = 4 * r.math.timeout_s
    added = 100 * (slow.math.timeout_s - r.math.timeout_s) / r.math.num_workers  # each row's extra limit, spread
    assert extra(slow, ["math"] * 100) - extra(r, ["math"] * 100) == pytest.approx(added)
    assert extra(slow, ["code"] * 100) == extra(r, ["code"] * 100)
    wide = RewardConfig()
    wide.sandbox.num_workers = 2 * r.sandbox.num_workers
    assert extra(wide, ["code"] * 100) == pytest.approx(extra(r, ["code"] * 100) / 2)
    # rewards without a time limit of their own (scored in the worker's threads) cost little
    assert 0 < extra(r, ["exact_match"] * 100) < extra(r, ["math"] * 100)
    assert extra(r, ["math", "code"] * 50) == pytest.approx(extra(r, ["math"] * 50) + extra(r, ["code"] * 50))


def test_the_worker_timeout_key_overrides_the_derived_one_and_is_validated(tiny_model_dir):
    from nemo_prorl.cluster.rewards import worker_timeout

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "reward.worker_timeout_s=7.5"])
    assert worker_timeout(cfg.reward, ["math"] * 1000) == 7.5
    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}"])
    assert cfg.reward.worker_timeout_s is None  # derived
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match=r"reward.worker_timeout_s=.*must be > 0, or null"):
            load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", f"reward.worker_timeout_s={bad}"])
        with pytest.raises(ConfigError, match=r"reward.worker_liveness_timeout_s=.*must be > 0"):
            load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", f"reward.worker_liveness_timeout_s={bad}"])


@pytest.mark.parametrize("limit,found_by", [
    ("reward.worker_timeout_s=15", "gave no answer"),  # the share's time limit (a liveness check would be later)
    ("reward.worker_liveness_timeout_s=5", "stopped answering"),  # long before the derived limit (>= 360 s)
], ids=["worker_timeout", "liveness_check"])
def test_a_stopped_reward_worker_is_replaced_and_its_rows_scored_again(two_nodes, tiny_model_dir, caplog,  # noqa: F811
                                                                       limit, found_by):
    """Node 1's worker is SIGSTOPped (hung: alive, silent). It is replaced, by whichever comes first: the
    share's time limit (reward.worker_timeout_s) or a liveness check it cannot answer
    (reward.worker_liveness_timeout_s); its rows are scored by the new one, so the step gets every result.
    (A watchdog resumes the worker long after both, so that a runtime which waits for it fails this test
    instead of hanging it.)"""
    from nemo_prorl.cluster.rewards import NodeRewardSuite
    from nemo_prorl.rewards import RewardInput, RewardSuite

    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "cluster.num_nodes=2",
                          "cluster.cpu_slots_per_node=1", f"cluster.ray_address={two_nodes.address}",
                          "policy=megatron", limit])
    rows = [("exact_match", RewardInput(response=f"{i}21", ground_truth="121")) for i in range(6)]
    rows += [("no_such_reward", RewardInput(response="x", ground_truth="x"))]
    names, inputs = [n for n, _ in rows], [x for _, x in rows]
    local = RewardSuite(cfg.reward)
    try:
        expected = [(r.reward, r.status) for r in local.score_batch(names, inputs)]
    finally:
        local.close()
    suite = NodeRewardSuite(cfg)
    watchdog = None
    try:
        assert [(r.reward, r.status) for r in suite.score_batch(names, inputs)] == expected
        pid = suite.workers[1].call_all("node_info", timeout_s=60)[0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        watchdog = threading.Timer(150.0, _resume, args=(pid,))
        watchdog.start()
        assert [(r.reward, r.status) for r in suite.score_batch(names, inputs)] == expected  # every row scored
        assert suite.replaced == 1, "the hung worker was waited for, not replaced"
        assert f"pid {pid}) {found_by} during score_batch" in caplog.text
        with pytest.raises(psutil.NoSuchProcess):  # the hung one is gone (killed, not resumed)
            psutil.Process(pid).wait(timeout=120)
            psutil.Process(pid)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        suite.close()
    _gone("RewardNode")


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
