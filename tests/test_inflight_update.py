"""Weight updates that land while an engine generates (asynchronous GRPO): the torch engine takes them between
two decode steps, rebuilds its KV cache with the new weights and records each token's policy version; an
engine pool keeps updates and generate calls apart where its engines cannot take them in flight."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_prorl.config import load_config
from nemo_prorl.policy.base import LazyWeight
from nemo_prorl.rollout.base import Completion, SamplingParams
from nemo_prorl.rollout.torch_engine import TorchRolloutEngine
from nemo_prorl.weight_sync import load_into_engine
from nemo_prorl.weight_sync.buffer import iter_buckets
from tests.conftest import TINY_OVERRIDES, VLLM_PYTHON, VLLM_TINY

TEMPERATURE = 0.8


def params(tok: Any, **kw: Any) -> SamplingParams:
    # no stop token: every response runs its max_tokens, past the step where an update lands
    base = dict(n=2, temperature=TEMPERATURE, top_p=1.0, max_tokens=8, stop_token_ids=(), seed=3)
    return SamplingParams(**{**base, **kw})


def pad_id(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def chat_prompts(tok: Any) -> list[list[int]]:
    """Two prompts of one length bucket: one chunk, so a step index means the same point for both."""
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                               tokenize=False)) for c in ("reverse 123", "sort 98765")]


def hf_model(model_dir: Path, perturb_seed: int | None = None) -> torch.nn.Module:
    """The checkpoint as a plain HF model; with a seed, every parameter moved by noise (new weights)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if perturb_seed is not None:
        g = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def lazy(model: torch.nn.Module) -> list[LazyWeight]:
    return [LazyWeight(n, (t.detach(),)) for n, t in model.state_dict().items()]


def hf_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """What `model` gives each response token: one forward over prompt + response, temperature applied."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def check_switch(comps: list[Completion], prompts: list[list[int]], old: torch.nn.Module, new: torch.nn.Module,
                 switch: int, v_old: int = 0, v_new: int = 1) -> None:
    """Every response switches from v_old to v_new at token `switch`; each token's rollout logprob is what
    the weights of its version compute for the whole sequence, and the new-version tokens differ from the
    old weights' (the check can fail)."""
    away = 0.0
    for c in comps:
        assert len(c.token_ids) > switch and len(c.versions) == len(c.token_ids)
        assert c.versions == [v_old] * switch + [v_new] * (len(c.token_ids) - switch)
        lp = torch.tensor(c.logprobs)
        lp_old = hf_logprobs(old, prompts[c.prompt_index], c.token_ids)
        lp_new = hf_logprobs(new, prompts[c.prompt_index], c.token_ids)
        torch.testing.assert_close(lp[:switch], lp_old[:switch], rtol=0, atol=1e-5)
        torch.testing.assert_close(lp[switch:], lp_new[switch:], rtol=0, atol=1e-5)
        away = max(away, float((lp[switch:] - lp_old[switch:]).abs().max()))
    assert away > 1e-3, away


def within(fn: Callable[[], Any], timeout_s: float) -> Any:
    """fn() in a thread of its own; fails the test (instead of hanging it) if it does not return in time."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  re-raised below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} did not return within {timeout_s}s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  the test looks at it
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def joined(t: threading.Thread, out: dict[str, Any], timeout_s: float = 120.0) -> Any:
    t.join(timeout_s)
    assert not t.is_alive(), f"no answer within {timeout_s}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def wait_until(cond: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------- in-process engine
@pytest.fixture()
def parts(tiny_model_dir: Path) -> tuple:
    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pad = pad_id(tok)

    def engine() -> TorchRolloutEngine:
        return TorchRolloutEngine(tiny_model_dir, device="cpu", dtype=cfg.model.dtype, max_num_seqs=256,
                                  pad_token_id=pad, tokenizer=tok)

    assert cfg.model.dtype == "float32"  # the 1e-5 comparisons below
    return engine, tok, chat_prompts(tok), hf_model(tiny_model_dir), hf_model(tiny_model_dir, perturb_seed=1)


def test_update_at_a_decode_step_switches_the_running_requests(parts):
    """An update landed by the generating thread itself (step_hook at step 3): tokens 0-2 come from version
    0, the rest from version 1, with logprobs of the new weights over the whole sequence (the KV cache is
    rebuilt, not reused)."""
    make, tok, prompts, old, new = parts
    engine = make()

    def hook(t: int) -> None:
        if t == 3:
            engine.begin_weight_update()
            engine.load_weights(new.state_dict().items())
            engine.finish_weight_update(version=1)

    engine.step_hook = hook
    comps = engine.generate(prompts, params(tok))
    assert engine.version == 1 and len(comps) == 4
    check_switch(comps, prompts, old, new, switch=3)


def test_update_from_another_thread_lands_between_two_decode_steps(parts):
    """The trainer's thread updates while the producer's thread generates: begin_weight_update returns
    while the generator waits between two steps, and the requests go on with the new weights."""
    make, tok, prompts, old, new = parts
    engine = make()
    reached, go = threading.Event(), threading.Event()

    def hook(t: int) -> None:
        if t == 3:
            reached.set()
            assert go.wait(120)

    engine.step_hook = hook
    gen, out = in_thread(lambda: engine.generate(prompts, params(tok)))
    assert reached.wait(120)
    within(engine.begin_weight_update, 60)
    engine.load_weights(new.state_dict().items())
    engine.finish_weight_update(version=1)
    go.set()
    check_switch(joined(gen, out), prompts, old, new, switch=3)


def test_begin_waits_for_the_running_model_call(parts):
    """An update never overlaps a model call: begin_weight_update waits for the one in progress, and the
    next one runs on the new weights only."""
    make, tok, prompts, old, new = parts
    engine = make()
    inside, release = threading.Event(), threading.Event()
    forward, calls = engine.model.forward, [0]

    def held_forward(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 4:  # the prefill, then the decode calls of tokens 1, 2 and 3: this one
            inside.set()
            assert release.wait(120)
        return forward(*args, **kwargs)

    engine.model.forward = held_forward
    gen, out = in_thread(lambda: engine.generate(prompts, params(tok)))
    assert inside.wait(120)
    begin, begun = in_thread(engine.begin_weight_update)
    wait_until(lambda: engine._gate.updating)  # it stopped new model calls ...
    time.sleep(0.2)
    assert begin.is_alive()  # ... and waits for the one running, which is held until `release`
    release.set()
    joined(begin, begun, 60)
    engine.load_weights(new.state_dict().items())
    engine.finish_weight_update(version=1)
    check_switch(joined(gen, out), prompts, old, new, switch=4)


def test_without_updates_nothing_changes(parts):
    """No update: every token of version 0, and the same output as a second engine's. The same weights
    synced again (version 1) give the same numbers; landed mid-generation they rebuild the cache and give
    the same tokens with logprobs equal to within rounding."""
    make, tok, prompts, old, _ = parts
    engine = make()
    p = params(tok, n=4, max_tokens=10, stop_token_ids=(tok.eos_token_id,), temperature=1.2)
    key = lambda cs: [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason) for c in cs]  # noqa: E731
    a = engine.generate(prompts, p)
    assert all(c.versions == [0] * len(c.token_ids) for c in a)
    assert key(make().generate(prompts, p)) == key(a)
    same = lazy(old)  # the checkpoint's weights once more
    load_into_engine(same, engine, bucket_mb=0.01, version=1)
    b = engine.generate(prompts, p)
    assert key(b) == key(a) and all(c.versions == [1] * len(c.token_ids) for c in b)

    def hook(t: int) -> None:
        if t == 3:
            load_into_engine(same, engine, bucket_mb=0.01, version=2)

    engine.step_hook = hook
    c = engine.generate(prompts, p)
    assert [x.token_ids for x in c] == [x.token_ids for x in a]
    for x, y in zip(c, a):
        assert x.versions == ([1] * 3 + [2] * (len(x.token_ids) - 3))[: len(x.token_ids)]
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=0, atol=1e-5)


def test_a_failed_sync_does_not_leave_generation_paused(parts):
    make, tok, prompts, _, new = parts
    engine = make()
    with pytest.raises(KeyError, match="no weight named 'nope'"):
        load_into_engine([*lazy(new)[:3], LazyWeight("nope", (torch.zeros(2),))], engine, bucket_mb=0.01)
    assert engine.version == 0 and not engine._gate.updating
    assert len(within(lambda: engine.generate(prompts, params(tok, max_tokens=2)), 60)) == 4


# ---------------------------------------------------------------------------------------- engine pools (Ray)
@pytest.fixture(scope="module")
def pool_parts(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    out = tmp_path_factory.mktemp("pool")
    # two engine actors (one would run in this process), each taking one of the two prompts
    cfg, _ = load_config([*TINY_OVERRIDES, f"model.path={tiny_model_dir}", "rollout.num_engines=2",
                          f"trainer.output_dir={out}"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return cfg, tok, chat_prompts(tok), hf_model(tiny_model_dir), hf_model(tiny_model_dir, perturb_seed=1)


def start_pool(cfg: Any, model_dir: Path, tok: Any, *, spec: dict[str, Any] | None = None, **changes: Any) -> Any:
    from nemo_prorl import cluster
    from nemo_prorl.rollout.pool import EnginePool
    from nemo_prorl.rollout.torch_engine import pool_setup

    setup = pool_setup(cfg, model_dir, cluster.plan_from_config(cfg, engine="torch"), pad_id(tok))
    # a short request time-out: a deadlock between an update and a generate call fails the test, named
    setup = dataclasses.replace(setup, spec={**setup.spec, **(spec or {})}, request_timeout_s=90.0, **changes)
    return EnginePool(cfg, setup, engine="torch")


def failing(weights: list[LazyWeight]) -> Iterator[LazyWeight]:
    """A sender that fails part-way through (after a few buckets have been loaded)."""
    yield from weights[:6]
    raise RuntimeError("sender failed")


def test_pool_engines_take_an_update_in_flight(pool_parts, tiny_model_dir):
    """Through the pool (torch engine actors, weight commands in their own thread): each engine's running
    generate call waits at step 3 (a test hook) until the sync from this thread lands, then goes on with
    the new weights; a sync that fails on the way leaves no engine paused."""
    import ray

    from nemo_prorl.rollout.pool import WEIGHTS_GROUP

    cfg, tok, prompts, old, new = pool_parts
    pool = start_pool(cfg, tiny_model_dir, tok, spec={"test_hold_at_step": [3, 1]})
    try:
        assert pool.in_flight_updates and pool.version == 0
        gen, out = in_thread(lambda: pool.generate(prompts, params(tok)))
        holding = lambda: all(ray.get([a.test_holding.options(concurrency_group=WEIGHTS_GROUP).remote()  # noqa: E731
                                       for a in pool.group.actors]))
        wait_until(lambda: holding() or not gen.is_alive())
        stats = load_into_engine(lazy(new), pool, bucket_mb=0.01, version=1)
        assert stats.num_buckets > 1 and pool.version == 1
        check_switch(joined(gen, out), prompts, old, new, switch=3)

        with pytest.raises(RuntimeError, match="sender failed"):
            load_into_engine(failing(lazy(new)), pool, bucket_mb=0.001, version=2)
        later = within(lambda: pool.generate(prompts, params(tok, max_tokens=4)), 120)
        assert pool.version == 1 and all(c.versions == [1] * 4 for c in later)
    finally:
        pool.close()


def test_pool_without_in_flight_updates_keeps_updates_and_generation_apart(pool_parts, tiny_model_dir):
    """Engines that cannot take an update in flight (vLLM; here torch engine actors started without it):
    a generate call that starts during an update waits for all of it, an update waits for the running
    generate call, and a failed sync releases the pool."""
    cfg, tok, prompts, old, new = pool_parts
    pool = start_pool(cfg, tiny_model_dir, tok, in_flight_updates=False)
    try:
        assert not pool.in_flight_updates
        gen, out = in_thread(lambda: pool.generate(prompts, params(tok, max_tokens=48)))
        wait_until(lambda: pool._gate.readers == 1 or not gen.is_alive())
        load_into_engine(lazy(new), pool, bucket_mb=0.01, version=1)  # waits for that call
        first = joined(gen, out)
        assert all(c.versions == [0] * 48 for c in first)
        for c in first[:1]:
            torch.testing.assert_close(torch.tensor(c.logprobs), hf_logprobs(old, prompts[c.prompt_index], c.token_ids),
                                       rtol=0, atol=1e-5)

        pool.begin_weight_update()  # back to the old weights, bucket by bucket, a generate call arriving meanwhile
        gen, out = in_thread(lambda: pool.generate(prompts, params(tok)))
        buckets = list(iter_buckets(lazy(old), int(0.01 * 2**20), pool.weight_dtype))
        assert len(buckets) > 1
        for bucket in buckets:
            time.sleep(0.2)
            assert gen.is_alive() and pool._gate.readers == 0  # not sent to the engines: they are half-updated
            pool.load_weights([(w.name, w.materialize()) for w in bucket])
        pool.finish_weight_update(version=2)
        second = joined(gen, out)
        for c in second:
            assert c.versions == [2] * 8
            torch.testing.assert_close(torch.tensor(c.logprobs), hf_logprobs(old, prompts[c.prompt_index], c.token_ids),
                                       rtol=0, atol=1e-5)

        with pytest.raises(RuntimeError, match="sender failed"):
            load_into_engine(failing(lazy(new)), pool, bucket_mb=0.001, version=3)
        assert not pool._gate.updating and pool.version == 2
        assert len(within(lambda: pool.generate(prompts, params(tok, max_tokens=2)), 120)) == 4
    finally:
        pool.close()


@pytest.mark.skipif(not VLLM_PYTHON, reason="no vLLM interpreter (PRORL_VLLM_PYTHON; make vllm-env)")
def test_vllm_pool_keeps_updates_and_generation_apart(vllm_model_dir, tmp_path):
    """The real vLLM engine actor: no update in flight; a generate call waits for the update in progress,
    and its tokens carry the version the update set."""
    from nemo_prorl.rollout import ROLLOUT_ENGINES

    cfg, _ = load_config([*VLLM_TINY, f"model.path={vllm_model_dir}", f"trainer.output_dir={tmp_path}",
                          f"rollout.vllm.python={VLLM_PYTHON}"])
    tok = AutoTokenizer.from_pretrained(vllm_model_dir)
    prompts = chat_prompts(tok)
    new = hf_model(vllm_model_dir, perturb_seed=2)
    engine = ROLLOUT_ENGINES.get("vllm")(cfg, vllm_model_dir)
    try:
        assert not engine.in_flight_updates
        before = engine.generate(prompts, params(tok))
        assert all(c.versions == [0] * len(c.token_ids) for c in before)
        engine.begin_weight_update()
        gen, out = in_thread(lambda: engine.generate(prompts, params(tok)))
        for bucket in iter_buckets(lazy(new), 2**16, engine.weight_dtype):
            time.sleep(0.1)
            assert gen.is_alive() and engine._gate.readers == 0
            engine.load_weights([(w.name, w.materialize()) for w in bucket])
        engine.finish_weight_update(version=7)
        comps = joined(gen, out, 300)
        assert engine.version == 7 and all(c.versions == [7] * len(c.token_ids) for c in comps)
        for c in comps:
            torch.testing.assert_close(torch.tensor(c.logprobs), hf_logprobs(new, prompts[c.prompt_index], c.token_ids),
                                       rtol=0, atol=1e-4)
    finally:
        engine.close()
