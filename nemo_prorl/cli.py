"""`prorl` command line: `prorl train [OVERRIDE ...]`, `prorl config [OVERRIDE ...]`, `prorl plan [OVERRIDE ...]`,
`prorl doctor [OVERRIDE ...]`, `prorl data inspect PATH`,
`prorl convert hf-to-megatron|megatron-to-hf SRC DST`, `prorl export CKPT OUT`, `prorl reset-reference RUN_DIR`,
`prorl eval CHECKPOINT [CHECKPOINT ...] [OVERRIDE ...]`.

Overrides are Hydra's: `algo.clip_eps_high=0.28`, `experiment=prorl_1p5b`, `trainer.num_steps=10`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from omegaconf import OmegaConf

from nemo_prorl.config.loader import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prorl", description="Prolonged RL (ProRL) for reasoning language models.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("train", "train with GRPO (the embedded CPU default unless an experiment says otherwise)"),
                        ("config", "print the resolved configuration and exit"),
                        ("plan", "print which node and device hosts each Megatron rank, engine and reward worker"),
                        ("doctor", "check this machine against what the config needs (OK / WARN / FAIL, with fixes); "
                         "exit status 1 when a needed check fails")]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algo.kl_coef=0 experiment=prorl_1p5b")
        if name == "doctor":
            sp.add_argument("--no-engine-start", action="store_true",
                            help="do not start a vLLM engine (by default, with rollout.engine=vllm, one "
                            "starts and samples)")
    from nemo_prorl.data import inspect
    from nemo_prorl.policy import convert

    inspect.add_parser(sub)
    convert.add_parser(sub)
    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder (safetensors, config, tokenizer)")
    ex.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    ex.add_argument("out", help="the new folder")
    ev = sub.add_parser("eval", help="pass@k of checkpoints on benchmark files (eval.tasks) or the validation set")
    ev.add_argument("args", nargs="+", metavar="CHECKPOINT_OR_OVERRIDE",
                    help="run folders, checkpoints or Hugging Face model folders, and Hydra overrides (KEY=VALUE), "
                    "e.g. runs/cpu_tiny eval.num_samples_per_prompt=64 'eval.pass_k=[1,64]'")
    ev.add_argument("--tasks", default=None, help="comma-separated names of eval.tasks to run (default: all)")
    ev.add_argument("--out", default=None, help="output folder (default: eval.output_dir)")
    rr = sub.add_parser("reset-reference", help="hard-reset the reference policy of a run at its next step "
                        "(a running job picks it up; a stopped one on resume)")
    rr.add_argument("run_dir", help="the run's trainer.output_dir")
    rr.add_argument("--reset-optimizer", action=argparse.BooleanOptionalAction, default=None,
                    help="also reset the optimizer state (default: algo.reference_reset.reset_optimizer)")
    return p


def reset_reference(run_dir: str, reset_optimizer: Optional[bool]) -> int:
    import json
    from pathlib import Path

    from nemo_prorl.trainer.grpo import RESET_REQUEST

    d = Path(run_dir)
    if not (d / "metrics.jsonl").is_file() and not (d / "checkpoints").is_dir():
        print(f"prorl: {d} is not a run folder (no metrics.jsonl or checkpoints/)", file=sys.stderr)
        return 2
    request = {} if reset_optimizer is None else {"reset_optimizer": reset_optimizer}
    (d / RESET_REQUEST).write_text(json.dumps(request))
    print(f"requested a reference reset: {d / RESET_REQUEST} (done, and logged as an event, after the next step)")
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    from nemo_prorl.eval.runner import EvalError, evaluate_all

    overrides = [a for a in args.args if "=" in a]
    checkpoints = [a for a in args.args if "=" not in a]
    try:
        cfg, _ = load_config(overrides)
        if args.tasks is not None:
            cfg.eval.tasks = select_tasks(cfg.eval.tasks, args.tasks.split(","))
        evaluate_all(cfg, checkpoints, args.out)
    except (ConfigError, EvalError) as e:
        print(f"prorl: {e}", file=sys.stderr)
        return 2
    return 0


def select_tasks(tasks: dict, names: Sequence[str]) -> dict:
    from nemo_prorl.eval.runner import EvalError

    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in tasks]
    if unknown or not names:
        raise EvalError(f"--tasks: unknown task(s) {unknown or '(none given)'}; eval.tasks has: "
                        f"{', '.join(sorted(tasks)) or '(none: set eval.tasks, or leave --tasks out to use the validation set)'}")
    return {n: tasks[n] for n in names}


def _quiet_libraries() -> None:
    # Our own progress bar is the one to watch; transformers' per-load bars and matplotlib's font cache
    # notices would bury it.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def ensure_hash_seed(command: str) -> None:
    """Re-run `prorl train` under a fixed PYTHONHASHSEED: reasoning-gym builds some puzzles
    (word_ladder, knight_swap, isomorphic_strings, ...) by iterating sets of strings, so a resumed run
    regenerates the same puzzles, and scorers agree with the trainer, only under the same hash seed."""
    if command in ("train", "eval") and os.environ.get("PYTHONHASHSEED") is None:
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "nemo_prorl.cli", *sys.argv[1:]])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if argv is None:  # the real command line, not a call from Python
        ensure_hash_seed(args.command)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    if args.command == "data":
        from nemo_prorl.data import inspect

        return inspect.run(args)
    if args.command == "export":
        from pathlib import Path

        from nemo_prorl.trainer.checkpoint import CheckpointError, export_hf

        try:
            src = export_hf(Path(args.checkpoint), Path(args.out))
        except CheckpointError as e:
            print(f"prorl: {e}", file=sys.stderr)
            return 2
        print(f"exported {src} -> {args.out}")
        return 0
    if args.command == "reset-reference":
        return reset_reference(args.run_dir, args.reset_optimizer)
    if args.command == "convert":
        from nemo_prorl.policy import convert

        return convert.run(args)
    if args.command == "eval":
        return run_eval_command(args)
    if args.command == "doctor":
        from nemo_prorl import doctor

        return doctor.main(args.overrides, start_engine=not args.no_engine_start)
    try:
        cfg, resolved = load_config(args.overrides)
    except ConfigError as e:
        print(f"prorl: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(OmegaConf.to_yaml(resolved))
        return 0
    if args.command == "plan":
        from nemo_prorl.cluster.plan import format_plan, plan_from_config

        print(format_plan(plan_from_config(cfg)))
        return 0
    from nemo_prorl.cluster import RayStartError, close_session
    from nemo_prorl.cluster.actors import ActorError
    from nemo_prorl.train import run_training
    from nemo_prorl.trainer.checkpoint import CheckpointError
    from nemo_prorl.trainer.grpo import TrainingHealthError

    try:
        run_training(cfg, resolved)
    except CheckpointError as e:  # a bad resume target or a failed checkpoint write: the message says which
        print(f"prorl: {e}", file=sys.stderr)
        return 2
    except TrainingHealthError as e:
        print(f"prorl: {e}", file=sys.stderr)
        return 3
    except (ActorError, RayStartError) as e:  # an actor failed or died (named), or Ray could not start
        print(f"prorl: {e}\nresume with resume=auto (from {cfg.trainer.output_dir}/checkpoints)", file=sys.stderr)
        return 4
    finally:
        close_session()  # the actors, placement groups and a private Ray cluster go with the run
    return 0


if __name__ == "__main__":
    sys.exit(main())
