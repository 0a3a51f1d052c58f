"""Reward throughput per domain, and the cost of the code sandbox against plain `subprocess.run`.

    python benchmarks/reward_throughput.py [--programs 20] [--math-rows 400]

Figures are for this machine and this process; the sandbox overhead is a ratio against a peer run of the
same program with the same inputs in this script (target: under 1.5x, issue 18).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nemo_prorl.config.schema import RewardConfig, SandboxConfig
from nemo_prorl.rewards import REWARDS, RewardInput, RewardSuite
from nemo_prorl.confine.sandbox import LocalSandbox

# A simple stdin/stdout problem with 10 test cases: print the sum of the numbers on the second line.
PROGRAM = "n = int(input())\nprint(sum(map(int, input().split())))\n"
INPUTS = [f"{k}\n{' '.join(str(i * k) for i in range(k))}\n" for k in range(1, 11)]
OUTPUTS = [f"{sum(i * k for i in range(k))}\n" for k in range(1, 11)]

MATH = [(r"\frac{1}{2}", "0.5"), (r"\sqrt{8}", r"2\sqrt{2}"), ("[0,1)", "[0, 1)"), (r"\{3,1\}", r"\{1,3\}"),
        ("42", "41"), (r"x^2+2x+1", "(x+1)^2"), ("50\\%", "0.5"), (r"\pi/3", "60")]


def timed(fn, *a, **k) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return time.perf_counter() - t0, out


def bench_sandbox(programs: int) -> dict[str, float]:
    python = os.path.realpath(sys._base_executable)  # type: ignore[attr-defined]
    sandbox = LocalSandbox(SandboxConfig())
    with tempfile.TemporaryDirectory() as d:
        prog = Path(d, "solution.py")
        prog.write_text(PROGRAM)

        def plain() -> None:
            for inp, exp in zip(INPUTS, OUTPUTS):
                r = subprocess.run([python, str(prog)], input=inp, capture_output=True, text=True, timeout=5)
                assert r.stdout == exp, r

        def boxed() -> None:
            run = sandbox.run(PROGRAM, INPUTS)
            assert not run.error and [t.stdout for t in run.tests] == OUTPUTS, run

        plain(), boxed()  # warm up page cache and imports
        # interleave the two so drift on a shared machine hits both alike
        t_plain = t_box = 0.0
        for _ in range(programs):
            t_plain += timed(plain)[0]
            t_box += timed(boxed)[0]
    return {"plain_s_per_program": t_plain / programs, "sandbox_s_per_program": t_box / programs,
            "overhead_x": t_box / t_plain, "namespaces": float(sandbox.namespaces)}


def bench_code_reward(programs: int, workers: int) -> float:
    truth = json.dumps({"inputs": INPUTS, "outputs": OUTPUTS})
    suite = RewardSuite(RewardConfig(sandbox=SandboxConfig(num_workers=workers)))
    rows = [RewardInput(response=f"```python\n{PROGRAM}```", ground_truth=truth)] * programs
    suite.score_batch(["code"] * 2, rows[:2])
    dt, res = timed(suite.score_batch, ["code"] * programs, rows)
    assert all(r.reward == 1.0 for r in res), res[:2]
    suite.close()
    return programs / dt


def bench_math(rows: int, workers: int) -> float:
    from nemo_prorl.config.schema import MathRewardConfig

    suite = RewardSuite(RewardConfig(math=MathRewardConfig(num_workers=workers)))
    # distinct rows (the reward caches the verdict of a repeated (answer, truth) pair): each pair shifted by k
    inputs = [RewardInput(response=rf"so \boxed{{{p}+{k}}}", ground_truth=f"{t}+{k}")
              for k in range(rows // len(MATH)) for p, t in MATH]
    suite.score_batch(["math"] * len(MATH), inputs[: len(MATH)])  # start the workers
    dt, res = timed(suite.score_batch, ["math"] * len(inputs), inputs)
    assert all(r.status == "ok" for r in res)
    suite.close()
    return len(inputs) / dt


def sample_rows() -> dict[str, list[RewardInput]]:
    """A few valid rows for the other verifiers (only those registered in this checkout)."""
    out: dict[str, list[RewardInput]] = {}
    if "ifeval" in REWARDS:
        meta = {"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                        "change_case:english_lowercase"],
                "kwargs": [{}, {"relation": "at least", "num_words": 5}, {}]}
        out["ifeval"] = [RewardInput(response="<think>x</think>this is a short answer without commas",
                                     ground_truth="", metadata=meta)]
    if "stem" in REWARDS:
        out["stem"] = [RewardInput(response="The answer is (C).", ground_truth="C"),
                       RewardInput(response=r"\boxed{3.2 \times 10^{-5}}", ground_truth="3.2e-5")]
    if "reasoning_gym" in REWARDS:
        import reasoning_gym

        ds = reasoning_gym.create_dataset("basic_arithmetic", size=4, seed=0)
        out["reasoning_gym"] = [RewardInput(
            response=f"<answer>{e['answer']}</answer>", ground_truth=str(e["answer"]), prompt=e["question"],
            metadata={"reasoning_gym": {"task": "basic_arithmetic", "entry_metadata": e["metadata"]}}) for e in ds]
    return out


def bench_inline(name: str, rows: list[RewardInput], seconds: float = 1.0) -> float:
    suite = RewardSuite()
    fn = suite.get(name)
    fn.score(rows[0])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for r in rows:
            res = fn.score(r)
            assert res.status == "ok", res
        n += len(rows)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=20)
    ap.add_argument("--math-rows", type=int, default=400)
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    s = bench_sandbox(a.programs)
    print(f"code, 10 stdin/stdout tests per program (run serially, {a.programs} programs each way):")
    print(f"  plain subprocess.run      {s['plain_s_per_program'] * 1e3:7.1f} ms/program")
    print(f"  local sandbox             {s['sandbox_s_per_program'] * 1e3:7.1f} ms/program   "
          f"(namespaces: {bool(s['namespaces'])})")
    print(f"  sandbox overhead          {s['overhead_x']:7.2f} x   (target < 1.5x)")
    for w in (1, 2, 4):
        print(f"  code reward, {w} workers    {bench_code_reward(4 * a.programs, w):7.1f} programs/s")
    for w in (1, 2):
        print(f"math, {w} worker process(es) {bench_math(a.math_rows, w):8.1f} checks/s")
    for name, rows in sample_rows().items():
        print(f"{name:<26}{bench_inline(name, rows):9.1f} checks/s (one call at a time)")


if __name__ == "__main__":  # the math pool spawns workers, which re-import this module
    main()
