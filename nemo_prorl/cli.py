"""`prorl` command line: `prorl train [OVERRIDE ...]`, `prorl config [OVERRIDE ...]`, `prorl data inspect PATH`,
`prorl convert hf-to-megatron|megatron-to-hf SRC DST`.

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
                        ("config", "print the resolved configuration and exit")]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algo.kl_coef=0 experiment=prorl_1p5b")
    from nemo_prorl.data import inspect
    from nemo_prorl.policy import convert

    inspect.add_parser(sub)
    convert.add_parser(sub)
    return p


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
    if command == "train" and os.environ.get("PYTHONHASHSEED") is None:
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
    if args.command == "convert":
        from nemo_prorl.policy import convert

        return convert.run(args)
    try:
        cfg, resolved = load_config(args.overrides)
    except ConfigError as e:
        print(f"prorl: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(OmegaConf.to_yaml(resolved))
        return 0
    from nemo_prorl.train import run_training

    run_training(cfg, resolved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
