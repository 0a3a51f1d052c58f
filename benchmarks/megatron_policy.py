"""The Megatron-core policy backend on this CPU, against peers in the same script.

  1. Throughput: tokens/s of logprobs and of a training step (forward + backward + Adam) for the
     transformers backend and the Megatron backend (TP=1 and TP=2 over gloo), same model, same batch.
  2. Memory: peak RSS of computing per-token logprobs for a 32k-vocabulary model over 4k tokens from the
     final hidden states, (a) as the transformers path does it (full float32 logits, log-softmax) and
     (b) with the chunked vocab-parallel path the Megatron backend uses (TP=1 and TP=2, per rank).

    python benchmarks/megatron_policy.py [--rows 32] [--repeats 3]

Each memory measurement runs in fresh processes so that peak RSS belongs to it alone.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, HIDDEN, TOKENS = 32768, 1024, 4096


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    """Current RSS, after resetting the peak (VmHWM) to it: what follows is measured from here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


# ------------------------------------------------------------------------------------------- throughput
def make_model_dir(root: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(root)
    return root


def make_batch(rows: int) -> dict[str, torch.Tensor]:
    from nemo_prorl.rollout.base import Completion
    from nemo_prorl.trainer.batching import build_batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (int(n),), generator=g).tolist() for n in torch.randint(32, 128, (rows // 8,), generator=g)]
    comps = [Completion(prompt_index=i // 8, token_ids=torch.randint(0, 4096, (int(n),), generator=g).tolist(),
                        logprobs=[0.0] * int(n), finish_reason="stop")
             for i, n in enumerate(torch.randint(16, 384, (rows,), generator=g))]
    batch = build_batch(prompts, comps, pad_token_id=0)
    batch["advantages"] = torch.randn(rows, generator=g)
    return batch


def throughput(rows: int, repeats: int) -> None:
    from nemo_prorl.config import load_config
    from nemo_prorl.policy import POLICY_BACKENDS
    from nemo_prorl.trainer.grpo import microbatch_loss

    batch = make_batch(rows)
    tokens = int(batch["attention_mask"].sum())
    padded = batch["attention_mask"].numel()
    loss = functools.partial(microbatch_loss, clip_eps_low=0.2, clip_eps_high=0.4, clip_ratio_c=None,
                             global_num_tokens=batch["response_mask"].sum(), global_num_seqs=float(rows), horizon=384,
                             loss_agg_mode="token-mean", kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0)
    print(f"batch: {rows} rows, {tokens} real tokens ({padded} in the trainer's padded layout)")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp))
        runs = [("hf", []), ("megatron TP=1", ["policy.megatron.tensor_parallel_size=1"]),
                ("megatron TP=2", ["policy.megatron.tensor_parallel_size=2"])]
        base = None
        for name, extra in runs:
            backend = name.split()[0]
            cfg, _ = load_config([f"policy={backend}", f"model.path={model_dir}", "policy.micro_batch_size=8",
                                  "policy.logprob_micro_batch_size=16", "policy.megatron.micro_batch_tokens=4096",
                                  "policy.megatron.logprob_micro_batch_tokens=8192", "algo.kl_coef=0", *extra])
            policy = POLICY_BACKENDS.get(backend)(cfg, model_dir)
            try:
                policy.logprobs(batch, temperature=1.0)  # warm up
                t = time.perf_counter()
                for _ in range(repeats):
                    policy.logprobs(batch, temperature=1.0)
                lp = repeats * tokens / (time.perf_counter() - t)
                t = time.perf_counter()
                for _ in range(repeats):
                    policy.train_minibatch(batch, loss, temperature=1.0)
                tr = repeats * tokens / (time.perf_counter() - t)
            finally:
                policy.close()
            base = base or (lp, tr)
            print(f"  {name:14s} logprobs {lp:8.0f} tok/s ({lp / base[0]:.2f}x hf)   "
                  f"train step {tr:8.0f} tok/s ({tr / base[1]:.2f}x hf)")


# ------------------------------------------------------------------------------------------- memory
def _inputs(tp_rank: int, tp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, 1, HIDDEN, generator=g)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).chunk(tp)[tp_rank].clone()
    labels = torch.randint(0, VOCAB, (1, TOKENS), generator=g)
    return hidden, weight, labels


def _memory_worker(rank: int, tp: int, port: int, mode: str, out: dict) -> None:
    torch.set_num_threads(1)
    hidden, weight, labels = _inputs(rank, tp)
    if mode == "full":  # the transformers path: all logits in float32, then log-softmax
        before = rss_mb()
        logits = torch.nn.functional.linear(hidden, weight).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.t().unsqueeze(-1))
    else:
        import torch.distributed as dist

        from nemo_prorl.policy.parallel import chunked_vocab_parallel_logprobs, init_model_parallel

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=tp)
        init_model_parallel(tp, 1)
        before = rss_mb()
        logp = chunked_vocab_parallel_logprobs(hidden, weight, labels, VOCAB)
    out[rank] = (peak_mb() - before, float(logp.sum()))


def memory() -> None:
    import torch.multiprocessing as mp

    print(f"logprobs of {TOKENS} tokens, vocabulary {VOCAB}, hidden {HIDDEN} (peak RSS above the inputs, per rank):")
    results = {}
    for name, mode, tp in [("full float32 logits (hf path)", "full", 1), ("chunked, TP=1", "chunked", 1),
                           ("chunked vocab-parallel, TP=2", "chunked", 2)]:
        with mp.Manager() as manager:
            out = manager.dict()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_memory_worker, args=(tp, port, mode, out), nprocs=tp, join=True)
            results[name] = dict(out)
        peak = max(v[0] for v in results[name].values())
        print(f"  {name:32s} {peak:8.0f} MB")
    sums = [r[0][1] for r in results.values()]  # every TP rank holds the full result
    print(f"  (sum of logprobs agrees across paths: {', '.join(f'{s:.2f}' for s in sums)})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    throughput(args.rows, args.repeats)
    memory()
