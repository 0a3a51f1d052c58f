"""Broad rollouts (BroRL: hundreds of samples per prompt) on the embedded tiny model with the torch engine:
generation tokens/s and peak memory for n = 16, 64, 256 samples of a few prompts, with the prompt's KV cache
copied into every sample's row ("before", rollout.share_prompt_cache=false) and shared by them ("after").

Each configuration runs in a subprocess of its own, so that its peak resident memory (ru_maxrss: the model,
torch, and the largest KV cache and activations any step held) is its own. Besides it, the engine counts the
bytes of the key/value tensors its cache holds after each decode step (engine.peak_cache_bytes): exact and
independent of the allocator, but it leaves out the one layer's full keys/values a shared cache builds
transiently per step (rollout/shared_prefix.py). Both runs of an n must give identical completions.

    .venv/bin/python benchmarks/broad_rollouts.py [--n 16 64 256] [--prompts 4] [--reps 2] [--max-num-seqs 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import resource
import subprocess
import sys
import time


def one(n: int, share: bool, num_prompts: int, reps: int, max_num_seqs: int) -> dict:
    """One configuration, in this process: the measurements as a dict."""
    from transformers import AutoTokenizer

    from nemo_prorl.config import load_config
    from nemo_prorl.data.records import DATA_SOURCES
    from nemo_prorl.data.templates import encode_prompts
    from nemo_prorl.demo.warmstart import warm_started_model
    from nemo_prorl.rollout import SamplingParams
    from nemo_prorl.rollout.torch_engine import TorchRolloutEngine

    cfg, _ = load_config([])  # the embedded default (experiment=cpu_tiny): its warm-started model and tasks
    model_dir = warm_started_model(cfg)
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = DATA_SOURCES.get(cfg.data.source, "data.source")(cfg).next_prompts(num_prompts)
    _, prompts, _ = encode_prompts(tok, records, cfg.data.max_prompt_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    engine = TorchRolloutEngine(model_dir, device="cpu", dtype=cfg.model.dtype, max_num_seqs=max_num_seqs,
                                pad_token_id=pad, tokenizer=tok, share_prompt_cache=share)
    params = SamplingParams(n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            max_tokens=cfg.rollout.max_response_length, stop_token_ids=(tok.eos_token_id,), seed=11)
    engine.generate(prompts[:1], dataclasses.replace(params, n=16))  # warm-up (kernels, allocator)
    engine.track_cache_bytes = True
    t0 = time.perf_counter()
    for _ in range(reps):
        out = engine.generate(prompts, params)
    secs = (time.perf_counter() - t0) / reps
    digest = hashlib.sha256(json.dumps([(c.prompt_index, c.token_ids, c.logprobs) for c in out]).encode()).hexdigest()
    return dict(n=n, share=share, secs=secs, tokens=sum(len(c.token_ids) for c in out),
                prompt_tokens=sum(len(p) for p in prompts), cache_mb=engine.peak_cache_bytes / 2**20,
                rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, digest=digest)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="rollout.max_num_seqs (the embedded default)")
    ap.add_argument("--one", nargs=2, metavar=("N", "SHARE"), help=argparse.SUPPRESS)  # a subprocess's run
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1] == "1", args.prompts, args.reps, args.max_num_seqs)))
        return
    rows = {}
    for n in args.n:
        for share in (False, True):
            cmd = [sys.executable, __file__, "--one", str(n), str(int(share)), "--prompts", str(args.prompts),
                   "--reps", str(args.reps), "--max-num-seqs", str(args.max_num_seqs)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows[n, share] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.prompts} prompts ({rows[args.n[0], False]['prompt_tokens']} prompt tokens), max_num_seqs="
          f"{args.max_num_seqs}; before = prompt cache copied per sample, after = shared (rollout.share_prompt_cache)")
    print("| n | tokens | tok/s before | tok/s after | speed | KV held before (MiB) | after | ratio "
          "| peak RSS before (MiB) | after | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        b, a = rows[n, False], rows[n, True]
        print(f"| {n} | {a['tokens']} | {b['tokens'] / b['secs']:.0f} | {a['tokens'] / a['secs']:.0f} | "
              f"{b['secs'] / a['secs']:.2f}x | {b['cache_mb']:.2f} | {a['cache_mb']:.2f} | "
              f"{b['cache_mb'] / a['cache_mb']:.2f}x | {b['rss_mb']:.0f} | {a['rss_mb']:.0f} | "
              f"{a['digest'] == b['digest']} |")


if __name__ == "__main__":
    main()
