"""Our trainer against TRL's GRPOTrainer on this CPU, same model, prompts, reward and hyperparameters.

    OMP_NUM_THREADS=2 python benchmarks/vs_trl.py [--steps 20] [--repeats 3] [--out runs/bench/vs_trl.json]
                                                  [--async-staleness 1]

With --async-staleness K our side runs asynchronous steps (algo.async.max_staleness=K): the torch engine
generates the next step's rollouts in an actor of its own while the trainer updates, one thread each.

Both sides start from the embedded default's warm-started tiny Qwen2 (conf/experiment/cpu_tiny.yaml) and
train on the synthetic source's prompts in the same order (TRL with shuffle_dataset=False; the script
checks the order each side actually saw), scored by our verifier through `RewardSuite` (wrapped as a TRL
reward function). A step is one generation round of 32 prompts x 8 samples (12 tokens at most,
temperature 1.0) and two AdamW updates on mini-batches of 16 prompts (lr 1e-4, constant; weight decay,
betas and grad clip from our schema), clip 0.2 / 0.4, KL to the reference with beta 1e-3 (k3).
Token-mean loss over each mini-batch: TRL's `bnpo` with one 128-row micro-batch per update is exactly
that (its `dapo` divides by half of the whole generation batch's tokens instead). Our side runs without
DAPO dynamic sampling, validation, checkpoints, TensorBoard or progress bar. Float32, 2 torch threads.

Each trainer runs in its own child process, so peak RSS (ru_maxrss) is its own; the sides alternate over
`--repeats` runs and the timings come from each side's fastest run, since on a shared 2-core machine any
other process (a test run) slows a side several times over; the CPU other processes took during that
run is printed with it. Seconds per step is the mean over steps 2..N (step 1 warms up); token rates are
over the same steps: generation = sampled tokens / sampling time, update = real prompt + response tokens
of the step / time in forward, backward and AdamW. Run k samples with seed 42 + k - 1 on both sides; the
reward curves are the mean over the runs' seeds.

Targets: our seconds per step at most half of TRL's; our reward after N steps (mean of the last 5 steps)
at least TRL's. Both are printed as figures, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIDES = ("ours", "trl")


def overrides(steps: int, out_dir: str, threads: int, seed: int) -> list[str]:
    """The cpu_tiny defaults, minus what TRL has no counterpart for (dynamic sampling, validation, our
    checkpoints and reporting), so both sides do the same work per step."""
    return ["algo.dynamic_sampling.enabled=false", "validation.every_n_steps=0", f"trainer.num_steps={steps}",
            f"trainer.checkpoint_every_n_steps={steps + 1}", "trainer.tensorboard=false", "trainer.plot=false",
            "trainer.progress_bar=false", f"trainer.output_dir={out_dir}", f"cluster.num_threads={threads}",
            "model.dtype=float32", f"trainer.seed={seed}"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------- our trainer
def run_ours(steps: int, threads: int, work: Path, seed: int, staleness: int = 0) -> dict[str, Any]:
    from nemo_prorl.config.loader import load_config
    from nemo_prorl.train import build_trainer
    from nemo_prorl.trainer.logger import MetricsLogger
    from nemo_prorl.trainer.phases import PhaseTimer

    t0 = time.perf_counter()
    # asynchronous steps: the engine is an actor of its own, the threads are shared out (trainer, engine)
    extra = [f"algo.async.max_staleness={staleness}", f"cluster.num_threads={max(1, threads // 2)}"] \
        if staleness else []
    cfg, resolved = load_config([*overrides(steps, str(work / "ours"), threads, seed), *extra])
    trainer = build_trainer(cfg, resolved)
    uids: list[str] = []
    tokens: list[int] = []
    next_prompts, make_batch = trainer.source.next_prompts, trainer.make_batch

    def recorded_prompts(num: int) -> list:  # the order our side actually trains on, for the parity check
        recs = next_prompts(num)
        uids.extend(r.uid for r in recs)
        return recs

    def counted_batch(groups: Any) -> dict[str, torch.Tensor]:  # real (unpadded) tokens the update sees
        batch = make_batch(groups)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.source.next_prompts, trainer.make_batch = recorded_prompts, counted_batch
    logger = MetricsLogger(Path(cfg.trainer.output_dir), total_steps=steps, start_step=0, tensorboard=False,
                           progress_bar=False)
    if staleness:
        trainer.start_producer()  # (fit() does this; the loop below drives run_step itself)
    setup_s, rows = time.perf_counter() - t0, []
    try:
        for step in range(1, steps + 1):
            start = time.perf_counter()
            trainer.step = step
            m = trainer.run_step(PhaseTimer(), logger)
            logger.log(step, m)  # TRL logs every step too
            prep = sum(m.get(f"time/{k}", 0.0) for k in ("score", "filter", "advantages", "logprobs"))
            rows.append(dict(step=step, seconds=time.perf_counter() - start, gen_s=m["time/generate"], prep_s=prep,
                             update_s=m["time/update"], gen_tokens=m["throughput/generated_tokens"],
                             tokens=tokens[-1], reward=m["reward/mean"]))
    finally:
        if trainer.producer is not None:
            trainer.producer.stop()
        logger.close()
        trainer.rewards.close()
        trainer.engine.close()
        trainer.policy.close()
    if staleness:  # the producer drew prompts ahead of the last step: those were never trained on
        uids = uids[: trainer.prompts_consumed]
    return dict(steps=rows, setup_s=setup_s, uids=uids, peak_rss_mb=peak_rss_mb(), overlapped=bool(staleness))


# ------------------------------------------------------------------------------------------- TRL
def trl_dataset(cfg: Any, steps: int) -> Any:
    """Our synthetic stream's first `steps` x 32 prompts, in order, as a conversational TRL dataset."""
    from datasets import Dataset

    from nemo_prorl.data import DATA_SOURCES

    records = DATA_SOURCES.get("synthetic", "data.source")(cfg).next_prompts(steps * cfg.algo.num_prompts_per_step)
    return Dataset.from_list([{"prompt": list(r.messages), "ground_truth": r.ground_truth, "reward_name": r.reward,
                               "uid": r.uid, "domain": r.domain} for r in records])


def make_reward_fn(cfg: Any, eos_ids: set[int], rewards_seen: list[float]) -> Callable[..., list[float]]:
    """Our verifier (by the row's reward name, through RewardSuite, as our trainer scores) as a TRL reward."""
    from nemo_prorl.rewards import RewardInput, RewardSuite

    suite = RewardSuite(cfg.reward)

    def prorl_verifier(prompts: list, completions: list, completion_ids: list, ground_truth: list,
                       reward_name: list, **_: Any) -> list[float]:
        inputs = [RewardInput(response=c[0]["content"], ground_truth=gt, prompt=p[-1]["content"],
                              finish_reason="stop" if ids and ids[-1] in eos_ids else "length")
                  for p, c, ids, gt in zip(prompts, completions, completion_ids, ground_truth)]
        out = [r.reward for r in suite.score_batch(reward_name, inputs)]
        rewards_seen.append(sum(out) / len(out))  # one call per generation round: the reward curve
        return out

    return prorl_verifier


def trl_args(cfg: Any, steps: int, out_dir: str) -> Any:
    """GRPOConfig mirroring our config; each line names the knob it matches."""
    from trl import GRPOConfig

    a, ro, o = cfg.algo, cfg.rollout, cfg.policy.optim
    n, updates = a.num_generations_per_prompt, a.num_prompts_per_step // a.num_prompts_per_minibatch
    return GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False,
        activation_checkpointing=False, gradient_checkpointing=False,  # TRL's default is on (the old name)
        model_init_kwargs={"dtype": "float32"}, seed=cfg.trainer.seed,
        # 32 prompts x 8 generated at once, then 2 updates of 16 prompts x 8 = 128 rows each (one micro-batch)
        num_generations=n, per_device_train_batch_size=a.num_prompts_per_minibatch * n, gradient_accumulation_steps=1,
        steps_per_generation=updates, num_iterations=a.num_epochs_per_step, max_steps=steps * updates,
        shuffle_dataset=False,  # our stream's order: step k trains on prompts 32(k-1) .. 32k-1 on both sides
        max_completion_length=ro.max_response_length, temperature=ro.temperature, top_p=ro.top_p, top_k=0,
        learning_rate=o.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        max_grad_norm=o.grad_clip, beta=a.kl_coef, epsilon=a.clip_eps_low, epsilon_high=a.clip_eps_high,
        loss_type="bnpo", scale_rewards="group",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )


class TRLProbe:
    """Times GRPOTrainer's phases by wrapping its methods: `_generate` (sampling, with chat templating and
    decoding, as our generate phase), `_generate_and_score_completions` (that plus old/ref logprobs, rewards
    and advantages), and the update from the end of `_prepare_inputs` to the optimizer step (callback)."""

    def __init__(self, trainer: Any, per_round: int, n: int) -> None:
        self.trainer, self.per_round, self.n = trainer, per_round, n
        self.rows: list[dict[str, Any]] = []
        self.uids: list[str] = []
        self.prep_end = self.round_start = 0.0
        self.cur: dict[str, Any] = {}
        trainer._generate = self._wrap(trainer._generate, "gen_s")
        trainer._generate_and_score_completions = self._wrap_round(trainer._generate_and_score_completions)
        trainer._prepare_inputs = self._wrap_prepare(trainer._prepare_inputs)

    def _wrap(self, fn: Callable, key: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.cur[key] = self.cur.get(key, 0.0) + time.perf_counter() - t
            return out
        return timed

    def _wrap_round(self, fn: Callable) -> Callable:
        def timed(inputs: list[dict[str, Any]]) -> dict[str, Any]:
            self.uids.extend(x["uid"] for x in inputs[:: self.n])  # each prompt comes n times in a row
            t = time.perf_counter()
            out = fn(inputs)
            gen_tokens = int(out["completion_mask"].sum())
            self.cur.update(round_s=time.perf_counter() - t, gen_tokens=gen_tokens,
                            tokens=int(out["prompt_mask"].sum()) + gen_tokens)
            return out
        return timed

    def _wrap_prepare(self, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.prep_end = time.perf_counter()
            return out
        return timed

    def callback(self) -> Any:
        from transformers import TrainerCallback

        probe = self

        class Cb(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step == 0:
                    probe.round_start = time.perf_counter()

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                probe.cur["update_s"] = probe.cur.get("update_s", 0.0) + time.perf_counter() - probe.prep_end

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if state.global_step % probe.per_round == 0:  # a round ends with its last optimizer step
                    now, c = time.perf_counter(), probe.cur
                    probe.rows.append(dict(step=len(probe.rows) + 1, seconds=now - probe.round_start,
                                           gen_s=c["gen_s"], prep_s=c["round_s"] - c["gen_s"],
                                           update_s=c["update_s"], gen_tokens=c["gen_tokens"], tokens=c["tokens"]))
                    probe.round_start, probe.cur = now, {}

        return Cb()


def run_trl(steps: int, threads: int, work: Path, seed: int) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from nemo_prorl.config.loader import load_config
    from nemo_prorl.data.templates import apply_chat_template_choice
    from nemo_prorl.demo.warmstart import warm_started_model

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    cfg, _ = load_config(overrides(steps, str(work / "ours"), threads, seed))
    model_dir = warm_started_model(cfg)
    tok = apply_chat_template_choice(AutoTokenizer.from_pretrained(model_dir), cfg.data.prompt.chat_template)
    rewards: list[float] = []
    args = trl_args(cfg, steps, str(work / "trl"))
    trainer = GRPOTrainer(model=str(model_dir), args=args, processing_class=tok, train_dataset=trl_dataset(cfg, steps),
                          reward_funcs=make_reward_fn(cfg, {tok.eos_token_id}, rewards))
    probe = TRLProbe(trainer, args.steps_per_generation, cfg.algo.num_generations_per_prompt)
    trainer.add_callback(probe.callback())
    setup_s = time.perf_counter() - t0
    trainer.train()
    for row, r in zip(probe.rows, rewards):
        row["reward"] = r
    return dict(steps=probe.rows, setup_s=setup_s, uids=probe.uids, peak_rss_mb=peak_rss_mb())


# ------------------------------------------------------------------------------------------- report
def summary(res: dict[str, Any]) -> dict[str, float]:
    rows = res["steps"]
    warm = rows[1:] or rows  # step 1 pays for first-call allocations on both sides

    def mean(key: str) -> float:
        return sum(r[key] for r in warm) / len(warm)

    other = mean("seconds") - mean("gen_s") - mean("prep_s") - mean("update_s")
    return {"s/step (mean, steps 2..N)": mean("seconds"), "total s (N steps)": sum(r["seconds"] for r in rows),
            "setup s": res["setup_s"],
            # asynchronous steps generate during the whole step: their generate phase only waits for groups
            "gen tok/s": sum(r["gen_tokens"] for r in warm) / sum(r["seconds" if res.get("overlapped") else "gen_s"]
                                                                  for r in warm),
            "update tok/s": sum(r["tokens"] for r in warm) / sum(r["update_s"] for r in warm),
            "peak RSS MB": res["peak_rss_mb"], "reward step 1": rows[0]["reward"],
            "reward last 5 (mean)": sum(r["reward"] for r in rows[-5:]) / len(rows[-5:]),
            "phase s/step: generate": mean("gen_s"), "phase s/step: score+logprobs": mean("prep_s"),
            "phase s/step: update": mean("update_s"), "phase s/step: rest": other,
            "other processes' CPU (cores)": res["other_cores"]}


def print_report(results: dict[str, dict[str, Any]], steps: int) -> dict[str, Any]:
    s = {side: summary(results[side]) for side in SIDES}
    print("\n| metric | ours | TRL | TRL/ours |\n|---|---:|---:|---:|")
    for key in s["ours"]:
        a, b = s["ours"][key], s["trl"][key]
        print(f"| {key} | {a:.3f} | {b:.3f} | {b / a if a else float('nan'):.2f} |")
    print("\n| step | ours reward | TRL reward | ours s | TRL s |\n|---:|---:|---:|---:|---:|")
    for a, b in zip(results["ours"]["steps"], results["trl"]["steps"]):
        print(f"| {a['step']} | {a['reward']:.3f} | {b['reward']:.3f} | {a['seconds']:.2f} | {b['seconds']:.2f} |")
    same = results["ours"]["uids"] == results["trl"]["uids"]
    print(f"\nprompts: {'identical, same order' if same else 'DIFFERENT'} on both sides "
          f"({len(results['ours']['uids'])} ours, {len(results['trl']['uids'])} TRL)")
    for side in SIDES:
        print(f"{side}: reward of the last 5 steps per seed: " +
              ", ".join(f"{x:.3f}" for x in results[side]["last5_per_seed"]))
    ratio = s["ours"]["s/step (mean, steps 2..N)"] / s["trl"]["s/step (mean, steps 2..N)"]
    ra, rb = s["ours"]["reward last 5 (mean)"], s["trl"]["reward last 5 (mean)"]
    targets = {"step_time_ratio_ours_over_trl": ratio, "step_time_met": ratio <= 0.5,
               "reward_ours": ra, "reward_trl": rb, "reward_met": ra >= rb, "prompt_order_identical": same}
    print(f"target: our s/step <= 0.5 x TRL's: {ratio:.2f} x -> {'met' if ratio <= 0.5 else 'NOT met'}")
    print(f"target: our reward after {steps} steps (mean of last 5) >= TRL's: {ra:.3f} vs {rb:.3f} -> "
          f"{'met' if ra >= rb else 'NOT met'}")
    return {"summary": s, "targets": targets}


def plot(results: dict[str, dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for side, label in zip(SIDES, ("ours (nemo_prorl)", "TRL GRPOTrainer")):
        rows = results[side]["steps"]
        ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], marker="o", ms=3, label=label)
    ax.set(xlabel="step (32 prompts x 8, 2 updates)", ylabel="mean reward", title="cpu_tiny: reward per step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "trl", "accelerate", "datasets")}


def busy_seconds() -> float:
    """CPU seconds all processes on this machine have spent so far (/proc/stat, in USER_HZ = 100 ticks)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def spawn(side: str, args: argparse.Namespace, work: Path, log: Path, seed: int) -> dict[str, Any]:
    """Run one trainer in a fresh interpreter (its own peak RSS, no shared state) and read its result,
    with the CPU that other processes took meanwhile: on a shared 2-core box, a test run next door can
    slow either side several times over."""
    result = work / f"{side}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", side, "--steps", str(args.steps), "--threads", str(args.threads),
           "--work", str(work), "--seed", str(seed), "--async-staleness", str(args.async_staleness)]
    own0, busy0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_seconds(), time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    own1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"{side} failed (exit {rc}); last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
    own = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
    res = json.loads(result.read_text())
    res["other_cores"] = max(busy_seconds() - busy0 - own, 0.0) / wall
    return res


def prebuild_model(args: argparse.Namespace, work: Path, seed: int) -> None:
    """Build (or find cached) the seed's warm-started model outside the timed children, so neither side's
    setup time includes the warm start."""
    from nemo_prorl.config.loader import load_config
    from nemo_prorl.demo.warmstart import warm_started_model

    warm_started_model(load_config(overrides(args.steps, str(work / "ours"), args.threads, seed))[0])


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The least disturbed run (shortest total) for the timings; the reward curve averaged over the runs'
    seeds (one seed's curve is noisy: about +-0.05 per step here), with each seed's last-5 mean."""
    best = dict(min(runs, key=lambda r: sum(s["seconds"] for s in r["steps"])))
    curves = [[s["reward"] for s in r["steps"]] for r in runs]
    mean_curve = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
    best["steps"] = [dict(s, reward=r) for s, r in zip(best["steps"], mean_curve)]
    best["last5_per_seed"] = [sum(c[-5:]) / len(c[-5:]) for c in curves]
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs per side, each with its own sampling seed (42, 43, ...); timings from the fastest, "
                    "reward curves averaged over the seeds")
    ap.add_argument("--async-staleness", type=int, default=0,
                    help="our side with algo.async.max_staleness=K (K > 0: the engine runs as an actor beside the "
                    "trainer, with half the threads each)")
    ap.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="runs/bench/vs_trl.json")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # inside a child: train, then hand the figures back through a file
        work = Path(args.work)
        res = run_ours(args.steps, args.threads, work, args.seed, args.async_staleness) if args.child == "ours" \
            else run_trl(args.steps, args.threads, work, args.seed)
        (work / f"{args.child}.json").write_text(json.dumps(res))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{args.steps} steps of 32 prompts x 8 samples (max 12 tokens), 2 updates each; {args.threads} threads; "
          f"versions: {', '.join(f'{k} {v}' for k, v in versions().items())}")
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            prebuild_model(args, Path(tmp), 42 + rep)
            for side in SIDES if rep % 2 == 0 else SIDES[::-1]:  # alternate, so drift hits both sides alike
                res = spawn(side, args, Path(tmp), out.with_name(f"{out.stem}_{side}_run{rep + 1}.log"), 42 + rep)
                runs[side].append(res)
                print(f"  {side} run {rep + 1}: {sum(r['seconds'] for r in res['steps']):.1f} s for {args.steps} steps "
                      f"(+{res['setup_s']:.1f} s setup); other processes used {res['other_cores']:.2f} cores",
                      flush=True)
    results = {side: best_of(runs[side]) for side in SIDES}
    report = print_report(results, args.steps)
    png = out.with_suffix(".png")
    plot(results, png)
    out.write_text(json.dumps({"steps": args.steps, "threads": args.threads, "versions": versions(), **report,
                               "per_step": {s: results[s]["steps"] for s in SIDES}}, indent=1))
    print(f"\nwrote {out} and {png}")


if __name__ == "__main__":
    main()
