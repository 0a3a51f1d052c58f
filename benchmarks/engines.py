"""Generation spread over several torch engine actors (rollout.num_engines) against one engine in the
controller's process, on this machine: the embedded run's step (32 prompts x 8 samples), seconds and
tokens/s, and whether the completions are identical (they must be: see README "Several rollout engines").

    .venv/bin/python benchmarks/engines.py [--engines 1 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from nemo_prorl import cluster
    from nemo_prorl.config import load_config
    from nemo_prorl.data.records import DATA_SOURCES
    from nemo_prorl.data.templates import encode_prompts
    from nemo_prorl.demo.warmstart import warm_started_model
    from nemo_prorl.rollout import ROLLOUT_ENGINES, SamplingParams
    from transformers import AutoTokenizer

    cfg, _ = load_config([])
    model_dir = warm_started_model(cfg)
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = DATA_SOURCES.get(cfg.data.source, "data.source")(cfg).next_prompts(cfg.algo.num_prompts_per_step)
    _, prompts, _ = encode_prompts(tok, records, cfg.data.max_prompt_length)
    params = SamplingParams(n=cfg.algo.num_generations_per_prompt, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_response_length,
                            stop_token_ids=(tok.eos_token_id,), seed=11)
    results, secs = {}, {}
    for k in args.engines:
        c, _ = load_config([f"rollout.num_engines={k}"])
        t0 = time.perf_counter()
        engine = ROLLOUT_ENGINES.get("torch")(c, model_dir)
        start = time.perf_counter() - t0
        try:
            engine.generate(prompts, params)  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.reps):
                results[k] = engine.generate(prompts, params)
            secs[k] = (time.perf_counter() - t0) / args.reps
        finally:
            engine.close()
        tokens = sum(len(x.token_ids) for x in results[k])
        print(f"{k} engine(s){' (in process)' if k == 1 else ' (Ray actors)'}: start {start:.1f} s, generate "
              f"{secs[k]:.3f} s, {tokens / secs[k]:.0f} tok/s")
    cluster.close_session()
    base = args.engines[0]
    for k in args.engines[1:]:
        same = [(x.prompt_index, x.token_ids, x.logprobs) for x in results[k]] == \
            [(x.prompt_index, x.token_ids, x.logprobs) for x in results[base]]
        print(f"{k} vs {base} engine(s): {secs[base] / secs[k]:.2f}x faster; identical completions: {same}")


if __name__ == "__main__":
    main()
