"""The README's tables of the CPU runs (`make run` and the recipes' miniatures), generated from the runs' own
output so that no figure in them is typed by hand.

    python benchmarks/readme_tables.py record cpu_tiny runs/cpu_tiny   # summarise a finished run: writes
        # benchmarks/results/readme/cpu_tiny.json and rewrites the README's block of that name
    python benchmarks/readme_tables.py check                           # the README's blocks equal the records
    python benchmarks/readme_tables.py check --run cpu_tiny runs/cpu_tiny   # ... and equal this run's output
    make readme-tables                                                 # runs every miniature, records each

A block in README.md sits between `<!-- readme-table:NAME -->` and `<!-- /readme-table:NAME -->`. The figures
depend on the CPU's floating-point kernels (the record names the CPU and the commit), so `check` compares the
README with the records (tests/test_readme_tables.py runs it, and checks that each record still matches its
preset's scale); `check --run` compares them with a run made on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "benchmarks" / "results" / "readme"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- readme-table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /readme-table:(?P=name) -->)",
                   re.DOTALL)
# What a record must agree on with its preset today for its figures to describe the preset (the scale of
# the run); a change to one of these in conf/experiment/ makes the record stale until the run is redone.
SCALE_KEYS = ("trainer.num_steps", "algo.num_prompts_per_step", "algo.num_generations_per_prompt",
              "data.num_validation_prompts", "validation.num_samples_per_prompt", "validation.temperature",
              "rollout.max_response_length")


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> Optional[str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        # what the run executed: the package and its presets (the README and these records change after it)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "nemo_prorl", "conf", "pyproject.toml"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _resolved_config(run_dir: Path) -> dict[str, Any]:
    """The resolved config the run saved with its last checkpoint."""
    import yaml

    ckpts = sorted((run_dir / "checkpoints").glob("step_*/prorl_config.yaml"))
    if not ckpts:
        raise SystemExit(f"{run_dir}: no checkpoints/step_*/prorl_config.yaml (is it a finished run?)")
    return yaml.safe_load(ckpts[-1].read_text())


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """The figures of a finished run: validation before (the first validation) and after (the last one),
    entropy, KL, step time, from its metrics.jsonl and saved config."""
    sys.path.insert(0, str(ROOT))
    from nemo_prorl.trainer.logger import read_jsonl

    cfg = _resolved_config(run_dir)
    rows, _ = read_jsonl(run_dir / "metrics.jsonl")
    pass_k = [k for k in cfg["validation"]["pass_k"]]
    vals = [r for r in rows if f"val/pass@{pass_k[0]}" in r]
    train = [r for r in rows if "actor/entropy" in r]
    if len(vals) < 2 or not train:
        raise SystemExit(f"{run_dir}/metrics.jsonl: needs two validations and a training step")
    first, last = vals[0], vals[-1]
    return {
        "experiment": cfg["experiment_name"],
        "scale": {k: _get(cfg, k) for k in SCALE_KEYS},
        "validation": {"before_step": first["step"], "after_step": last["step"],
                       "before": {f"pass@{k}": first[f"val/pass@{k}"] for k in pass_k},
                       "after": {f"pass@{k}": last[f"val/pass@{k}"] for k in pass_k}},
        "entropy": [train[0]["actor/entropy"], train[-1]["actor/entropy"]],
        "max_kl": max(r.get("actor/kl", 0.0) for r in train),
        # DAPO's filter: the share of generated groups dropped as all right or all wrong, over the run
        "filtered_frac": sum(r.get("filter/filtered_group_frac", 0.0) for r in train) / len(train),
        "seconds_per_step": sum(r["time/step"] for r in train) / len(train),
        "train_seconds": sum(r["time/step"] for r in train),
        "cpu": _cpu(),
        "commit": _commit(),
    }


def render(rec: dict[str, Any]) -> str:
    """The markdown of a record: the before/after table and a line of figures."""
    s, v = rec["scale"], rec["validation"]
    head = (f"| validation ({s['data.num_validation_prompts']} held-out prompts, "
            f"{s['validation.num_samples_per_prompt']} samples each) | before | after {v['after_step']} steps | change |")
    lines = [head, "| --- | --- | --- | --- |"]
    for k, b in v["before"].items():
        a = v["after"][k]
        lines.append(f"| {k} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    minutes, seconds = divmod(round(rec["train_seconds"]), 60)
    lines += ["", f"Entropy per token {rec['entropy'][0]:.2f} -> {rec['entropy'][1]:.2f}, KL to the reference at "
              f"most {rec['max_kl']:.2f}, {rec['filtered_frac']:.0%} of groups filtered, "
              f"{rec['seconds_per_step']:.2f} s per step, {minutes} min {seconds} s of training "
              f"({s['algo.num_prompts_per_step']} prompts x {s['algo.num_generations_per_prompt']} samples "
              f"per step; measured on {rec['cpu']}, commit {rec['commit'] or 'unknown'})."]
    return "\n".join(lines) + "\n"


def blocks(text: str) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}


def write_block(text: str, name: str, body: str) -> str:
    if name not in blocks(text):
        raise SystemExit(f"{README}: no block <!-- readme-table:{name} --> ... <!-- /readme-table:{name} -->")
    return BLOCK.sub(lambda m: m.group(0) if m.group("name") != name else
                     m.group(1) + body + m.group(4), text)


def load_record(name: str) -> dict[str, Any]:
    return json.loads((RECORDS / f"{name}.json").read_text())


def check(readme: Path = README, runs: Optional[dict[str, Path]] = None) -> list[str]:
    """What disagrees: a README block without a record, or unequal to its record's rendering; with `runs`,
    a record whose validation figures differ from a run's."""
    problems = []
    for name, body in blocks(readme.read_text()).items():
        path = RECORDS / f"{name}.json"
        if not path.is_file():
            problems.append(f"README block {name!r}: no record {path}")
            continue
        if body != render(load_record(name)):
            problems.append(f"README block {name!r} differs from {path} (run `record` again)")
    for name, run_dir in (runs or {}).items():
        got, want = summarize_run(run_dir), load_record(name)
        for key in ("scale", "validation"):
            if got[key] != want[key]:
                problems.append(f"{name}: {key} of {run_dir} is {got[key]}, the record says {want[key]}")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="summarise a finished run and rewrite the README block of that name")
    r.add_argument("name")
    r.add_argument("run_dir", type=Path)
    c = sub.add_parser("check", help="the README's blocks equal the records (and, with --run, a run's output)")
    c.add_argument("--run", nargs=2, action="append", metavar=("NAME", "RUN_DIR"), default=[])
    args = p.parse_args(argv)
    if args.cmd == "record":
        rec = summarize_run(args.run_dir)
        RECORDS.mkdir(parents=True, exist_ok=True)
        (RECORDS / f"{args.name}.json").write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        README.write_text(write_block(README.read_text(), args.name, render(rec)))
        print(render(rec))
        return 0
    problems = check(runs={n: Path(d) for n, d in args.run})
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
