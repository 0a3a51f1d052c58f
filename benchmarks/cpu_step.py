"""Where a step of the embedded CPU default goes, phase by phase, and what the shared prefill saves.

    python benchmarks/cpu_step.py [--steps 8] [--profile] [OVERRIDES]

1. Runs `--steps` training steps of `make run`'s configuration (after two warm-up steps) and prints each
   phase's mean seconds and share of the step (the trainer's own phase timers).
2. Times the rollout engine on one step's prompts (32 prompts x 8 samples) two ways in the same process:
   the n samples of a prompt sharing one prefill (what the engine does), and the peer run with every
   sample prefilled on its own (the same rows passed as 256 one-sample prompts). Both draw the same
   random numbers, so they also must produce the same tokens.
3. `--profile`: the top functions by cumulative time under cProfile, for the same steps.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from nemo_prorl.config import load_config
from nemo_prorl.data.templates import encode_prompts
from nemo_prorl.rollout.base import SamplingParams
from nemo_prorl.train import build_trainer
from nemo_prorl.trainer.logger import MetricsLogger
from nemo_prorl.trainer.phases import PHASES, PhaseTimer


def phase_table(rows: list[dict[str, float]]) -> str:
    step = sum(r["time/step"] for r in rows) / len(rows)
    lines = [f"{'phase':<14}{'s/step':>9}{'share':>8}"]
    for p in PHASES:
        s = sum(r.get(f"time/{p}", 0.0) for r in rows) / len(rows)
        if s > 0:
            lines.append(f"{p:<14}{s:>9.3f}{s / step:>8.1%}")
    lines.append(f"{'step':<14}{step:>9.3f}")
    return "\n".join(lines)


def time_generate(trainer, reps: int = 5) -> None:
    cfg = trainer.cfg
    records = trainer.source.next_prompts(cfg.algo.num_prompts_per_step)
    _, ids, _ = encode_prompts(trainer.tokenizer, records, cfg.data.max_prompt_length)
    n = cfg.algo.num_generations_per_prompt
    base = dict(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_response_length,
                stop_token_ids=(trainer.tokenizer.eos_token_id,), seed=11)
    runs = {"shared prefill (engine)": (ids, SamplingParams(n=n, **base)),
            "prefill per sample (peer)": ([p for p in ids for _ in range(n)], SamplingParams(n=1, **base))}
    out, secs = {}, {}
    for name, (prompts, params) in runs.items():
        trainer.engine.generate(prompts, params)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            out[name] = trainer.engine.generate(prompts, params)
        secs[name] = (time.perf_counter() - t0) / reps
    tokens = sum(len(c.token_ids) for c in out["shared prefill (engine)"])
    prompt_tokens = sum(map(len, ids))
    print(f"\ngeneration of {len(ids)} prompts x {n} samples ({prompt_tokens} distinct prompt tokens, "
          f"{tokens} generated tokens):")
    for name, s in secs.items():
        print(f"  {name:<28}{s:>8.3f} s  {tokens / s:>8.0f} tok/s")
    peer, ours = secs["prefill per sample (peer)"], secs["shared prefill (engine)"]
    print(f"  speed-up {peer / ours:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides on top of the embedded default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with TemporaryDirectory() as tmp:
        cfg, resolved = load_config([f"trainer.output_dir={tmp}", "trainer.progress_bar=false",
                                     "trainer.tensorboard=false", "validation.every_n_steps=0",
                                     f"trainer.num_steps={args.steps + 2}", *args.overrides])
        trainer = build_trainer(cfg, resolved)
        logger = MetricsLogger(Path(tmp), total_steps=args.steps + 2, start_step=0, tensorboard=False,
                               progress_bar=False)
        rows, prof = [], cProfile.Profile()
        try:
            for i in range(args.steps + 2):
                trainer.step += 1
                if i == 2 and args.profile:
                    prof.enable()
                m = trainer.run_step(PhaseTimer(), logger)
                if i >= 2:
                    rows.append(m)
            prof.disable()
            print(f"embedded default, {args.steps} steps after 2 warm-up steps, {args.threads} threads:")
            print(phase_table(rows))
            rounds = sum(r["filter/generation_rounds"] for r in rows) / len(rows)
            print(f"DAPO generation rounds per step: {rounds:.2f}")
            time_generate(trainer)
            if args.profile:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        finally:
            logger.close()
            trainer.engine.close()
            trainer.policy.close()
            trainer.rewards.close()


if __name__ == "__main__":
    main()
