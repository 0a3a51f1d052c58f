"""`prorl eval` and the evaluation core shared with validation: pass@k per task, domain and overall on
real benchmark files of every domain, scored by the real rewards; reports; bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pytest
import torch

from nemo_prorl.algo.passk import pass_at_k_exact
from nemo_prorl.cli import main
from nemo_prorl.config import load_config
from nemo_prorl.config.loader import ConfigError
from nemo_prorl.data.formats import FORMATS, RowContext, RowError
from nemo_prorl.config.schema import PromptFormatConfig
from nemo_prorl.data.records import PromptRecord
from nemo_prorl.trainer.evaluation import EvalResult, curve_ks, summarize, validation_metrics
from nemo_prorl.eval.runner import EvalError, evaluate_all, load_tasks
from nemo_prorl.rollout import ROLLOUT_ENGINES
from nemo_prorl.rollout.base import Completion, RolloutEngine, SamplingParams
from tests.checks import assert_every_step_updated

# ---------------------------------------------------------------- the core, golden values


def _rec(uid: str, domain: str) -> PromptRecord:
    return PromptRecord(uid=uid, messages=({"role": "user", "content": uid},), domain=domain, reward="exact",
                        ground_truth="x")


def test_summary_golden_values():
    # 3 prompts of task a (math), 2 of task b (math), 1 of task c (code); n = 4 samples each.
    counts = [0, 1, 4, 2, 3, 1]
    tasks = ["a", "a", "a", "b", "b", "c"]
    domains = ["math"] * 5 + ["code"]
    correct = torch.tensor([[j < c for j in range(4)] for c in counts])
    res = EvalResult(tasks=tasks, records=[_rec(f"{t}:{i}", d) for i, (t, d) in enumerate(zip(tasks, domains))],
                     correct=correct, rewards=correct.float(), lengths=torch.full((6, 4), 3),
                     statuses=["ok"] * 23 + ["timeout"])
    s = summarize(res, [1, 2, 4])
    exact = {k: [pass_at_k_exact(4, c, k) for c in counts] for k in (1, 2, 4)}
    assert s["tasks"]["a"]["pass@k"]["2"] == pytest.approx(sum(exact[2][:3]) / 3, abs=1e-12)
    assert s["tasks"]["b"]["pass@k"]["1"] == pytest.approx((2 / 4 + 3 / 4) / 2, abs=1e-12)
    # a domain pools its prompts: math = 5 prompts of tasks a and b
    assert s["domains"]["math"]["pass@k"]["2"] == pytest.approx(sum(exact[2][:5]) / 5, abs=1e-12)
    task_mean = (sum(exact[2][:3]) / 3 + sum(exact[2][3:5]) / 2) / 2  # tasks a and b weigh alike
    assert s["domains"]["math"]["pass@k_task_mean"]["2"] == pytest.approx(task_mean, abs=1e-12)
    assert s["overall"]["pass@k"]["4"] == pytest.approx(5 / 6, abs=1e-12)
    assert s["tasks"]["c"]["timeout_frac"] == 0.25 and s["overall"]["num_prompts"] == 6
    assert s["tasks"]["a"]["per_prompt"] == [["a:0", 0], ["a:1", 1], ["a:2", 4]]
    m = validation_metrics(res, [1, 4])
    assert m["val/pass@1"] == pytest.approx(sum(counts) / 24, abs=1e-12)
    assert m["val/pass@4/code"] == 1.0 and m["val/task/a/pass@1"] == pytest.approx(5 / 12)
    assert m["val/reward/timeout_frac"] == pytest.approx(1 / 24)


def test_paper_suite_config():
    cfg, _ = load_config(["eval=prorl"])
    assert {"aime24", "math500", "gpqa_diamond", "ifeval", "reasoning_gym", "humaneval_plus"} <= set(cfg.eval.tasks)
    assert cfg.eval.tasks["gpqa_diamond"].format == "multiple_choice" and cfg.eval.pass_k == [1, 16]


def test_curve_ks():
    assert curve_ks(16, [1, 16]) == [1, 2, 4, 8, 16]
    assert curve_ks(12, [3]) == [1, 2, 3, 4, 8, 12]


# ---------------------------------------------------------------- GPQA-style multiple choice rows

CTX = RowContext(uid="gpqa:0", domain=None, reward=None, prompt=PromptFormatConfig())


def test_multiple_choice_rows():
    mc = FORMATS.get("multiple_choice")
    rec = mc({"question": "Which is a noble gas?", "choices": ["N", "Ar", "O"], "answer": 1}, CTX)
    assert rec.ground_truth == "B" and rec.reward == "stem" and "B) Ar" in rec.messages[0]["content"]
    assert mc({"question": "q", "choices": ["x", "y"], "answer": "(b)"}, CTX).ground_truth == "B"
    assert mc({"question": "q", "choices": ["x", "y"], "answer": "y"}, CTX).ground_truth == "B"
    gpqa = {"Question": "What is 2+2?", "Correct Answer": "4", "Incorrect Answer 1": "3",
            "Incorrect Answer 2": "5", "Incorrect Answer 3": "22"}
    rec = mc(gpqa, CTX)
    letter = rec.ground_truth
    assert f"{letter}) 4" in rec.messages[0]["content"] and mc(gpqa, CTX) == rec  # same order every time
    with pytest.raises(RowError, match="'answer'"):
        mc({"question": "q", "choices": ["x", "y"], "answer": "E"}, CTX)
    with pytest.raises(RowError, match="'choices'"):
        mc({"question": "q", "choices": ["x"], "answer": "A"}, CTX)
    with pytest.raises(RowError, match="Incorrect Answer 2"):
        mc({k: v for k, v in gpqa.items() if k != "Incorrect Answer 2"}, CTX)


# ---------------------------------------------------------------- benchmark files of every domain

def _jsonl(path: Path, rows: Iterable[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ADD = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"
MUL = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a * b)\n"


def write_benchmarks(d: Path) -> list[str]:
    """Hydra overrides for one small benchmark per domain, plus the right and a wrong response per prompt
    (by ground truth) for the scripted engine below."""
    math = _jsonl(d / "aime.jsonl", [{"problem": "What is 1/2 + 1/3?", "answer": "\\frac{5}{6}"},
                                     {"problem": "What is 7 * 6?", "answer": "42"}])
    code = _jsonl(d / "code.jsonl", [
        {"problem": "Read a and b, print a + b.", "tests": {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}},
        {"problem": "Read a and b, print a * b.", "tests": {"inputs": ["3 4\n"], "outputs": ["12\n"]}}])
    gpqa = _jsonl(d / "gpqa.jsonl", [{"Question": "Which particle has no charge?", "Correct Answer": "neutron",
                                      "Incorrect Answer 1": "proton", "Incorrect Answer 2": "electron",
                                      "Incorrect Answer 3": "positron"}])
    ifeval = _jsonl(d / "ifeval.jsonl", [{"prompt": "Describe a cat without any commas.",
                                          "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}])
    return [f"+eval.tasks={{aime:{{path:{math},format:deepscaler}},code:{{path:{code},format:eurus_code}},"
            f"gpqa:{{path:{gpqa}}},"  # format auto: GPQA's columns
            f"ifeval:{{path:{ifeval},format:ifeval}},"
            "rg:{format:reasoning_gym,tasks:[basic_arithmetic],size_per_task:2,seed:5}}"]


def right_and_wrong(rec: PromptRecord) -> tuple[str, str]:
    if rec.domain == "math":
        return f"So the answer is \\boxed{{{rec.ground_truth}}}.", "\\boxed{17}"
    if rec.domain == "code":
        prog = ADD if "a + b" in rec.messages[0]["content"] else MUL
        return f"```python\n{prog}```", "```python\nprint(0)\n```"
    if rec.domain == "stem":
        wrong = "A" if rec.ground_truth != "A" else "B"
        return f"The answer is ({rec.ground_truth}).", f"The answer is ({wrong})."
    if rec.domain == "instruction_following":
        return "A cat is a small soft animal.", "A cat is small, soft, and fluffy."
    return f"<answer>{rec.ground_truth}</answer>", "<answer>nope</answer>"


class ScriptedEngine(RolloutEngine):
    """Answers prompt i right in its first `num_right[i]` samples and wrong in the others, so every
    figure downstream (rewards, pass@k, tables) has a known value. Everything else in the test is real."""

    script: dict[tuple[int, ...], tuple[str, str, int]] = {}

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def generate(self, prompts, params: SamplingParams) -> list[Completion]:
        out = []
        for i, p in enumerate(prompts):
            right, wrong, c = self.script[tuple(p)]
            for j in range(params.n):
                ids = self.tokenizer.encode(right if j < c else wrong, add_special_tokens=False)
                out.append(Completion(prompt_index=i, token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop"))
        return out

    def load_weights(self, weights) -> None:  # evaluation never syncs weights
        raise AssertionError("not used")


@pytest.fixture()
def scripted(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    if "scripted" not in ROLLOUT_ENGINES:
        ROLLOUT_ENGINES.register("scripted")(lambda cfg, model_dir: ScriptedEngine(AutoTokenizer.from_pretrained(model_dir)))
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_eval_every_domain_with_real_rewards(tmp_path: Path, tiny_model_dir: Path, scripted):
    from nemo_prorl.data.templates import encode_prompts

    cfg, _ = load_config(["rollout.engine=scripted", "eval.num_samples_per_prompt=4", "eval.pass_k=[1,2,4]",
                          *write_benchmarks(tmp_path)])
    tasks = load_tasks(cfg)
    assert {t: len(r) for t, r in tasks.items()} == {"aime": 2, "code": 2, "gpqa": 1, "ifeval": 1, "rg": 2}
    expected: dict[str, list[int]] = {}
    for t, records in sorted(tasks.items()):
        kept, ids, _ = encode_prompts(scripted, records, cfg.data.max_prompt_length)
        for k, (rec, p) in enumerate(zip(kept, ids)):
            c = (k * 3 + len(t)) % 5  # 0..4 right answers out of 4 samples
            ScriptedEngine.script[tuple(p)] = (*right_and_wrong(rec), min(c, 4))
            expected.setdefault(t, []).append(min(c, 4))
    report = evaluate_all(cfg, [str(tiny_model_dir)], tmp_path / "out")
    res = report["checkpoints"][tiny_model_dir.name]
    for t, counts in expected.items():
        got = res["tasks"][t]
        assert [c for _, c in got["per_prompt"]] == counts, t  # the real verifier agreed with the script
        for k in (1, 2, 4):
            want = sum(pass_at_k_exact(4, c, k) for c in counts) / len(counts)
            assert got["pass@k"][str(k)] == pytest.approx(want, abs=1e-12), (t, k)
        assert got["error_frac"] == 0 and got["timeout_frac"] == 0
    assert res["tasks"]["gpqa"]["domain"] == "stem" and res["tasks"]["rg"]["domain"] == "logic"
    assert set(res["domains"]) == {"code", "instruction_following", "logic", "math", "stem"}
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["checkpoints"][tiny_model_dir.name]["overall"] == res["overall"]
    assert (tmp_path / "out" / "pass_at_k.png").stat().st_size > 10_000


def test_eval_keeps_upstream_ifeval_semantics_without_the_training_gate(tmp_path: Path, tiny_model_dir: Path,
                                                                         scripted):
    """Issue 29: training gates IFEval answers that attempt nothing ('.' breaks no prohibition); `prorl eval`
    must not, or its figures would not be IFEval's. The config default is the training one (gate on)."""
    from nemo_prorl.data.templates import encode_prompts
    from nemo_prorl.rewards import RewardInput, RewardSuite

    rows = _jsonl(tmp_path / "ifeval.jsonl", [{"prompt": "Describe a cat without any commas.",
                                              "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}])
    cfg, _ = load_config(["rollout.engine=scripted", "eval.num_samples_per_prompt=2", "eval.pass_k=[1,2]",
                          f"+eval.tasks={{ifeval:{{path:{rows},format:ifeval}}}}"])
    assert cfg.reward.ifeval.require_attempt is True
    (rec,) = load_tasks(cfg)["ifeval"]
    _, ids, _ = encode_prompts(scripted, [rec], cfg.data.max_prompt_length)
    ScriptedEngine.script[tuple(ids[0])] = (".", "Yes, it is.", 1)
    training = RewardSuite(cfg.reward)
    try:
        gated = training.score(rec.reward, RewardInput(".", rec.ground_truth, metadata=rec.metadata))
    finally:
        training.close()
    assert gated.reward == 0.0 and "no attempt" in gated.reason, gated
    got = evaluate_all(cfg, [str(tiny_model_dir)], tmp_path / "out")["checkpoints"][tiny_model_dir.name]
    assert got["tasks"]["ifeval"]["per_prompt"][0][1] == 1  # '.' counted right, as upstream IFEval counts it


def test_eval_cli_two_checkpoints_real_model(tiny_cfg, tmp_path: Path, capsys):
    """`prorl eval` on a run folder and a plain HF folder, with the torch engine on the validation set."""
    from nemo_prorl.train import run_training

    cfg, resolved = tiny_cfg
    run_training(cfg, resolved)
    run_dir, model_dir = cfg.trainer.output_dir, cfg.model.path
    assert_every_step_updated(json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl"))
    rc = main(["eval", run_dir, model_dir, f"model.path={model_dir}", "eval.num_samples_per_prompt=8",
               "eval.pass_k=[1,8]", "rollout.max_response_length=6", "data.num_validation_prompts=8",
               "--out", str(tmp_path / "ev")])
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    labels = list(report["checkpoints"])
    assert labels == ["run/step_000003", Path(model_dir).name]
    for r in report["checkpoints"].values():
        assert r["num_samples_per_prompt"] == 8 and r["ks"] == [1, 2, 4, 8]
        curve = [r["overall"]["pass@k"][str(k)] for k in r["ks"]]
        assert curve == sorted(curve) and 0 <= curve[0] <= curve[-1] <= 1  # pass@k cannot fall with k
        assert f"{r['overall']['pass@k']['1']:.3f}" in out
    assert "run/step_000003" in out and (tmp_path / "ev" / "pass_at_k.png").is_file()


# ---------------------------------------------------------------- bad input

def test_bad_eval_input_is_named(tmp_path: Path, tiny_model_dir: Path, capsys):
    bad = tmp_path / "math.jsonl"
    _jsonl(bad, [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}])
    cfg, _ = load_config([f"+eval.tasks={{m:{{path:{bad},format:deepscaler}}}}"])
    with pytest.raises(EvalError, match=rf"eval.tasks.m: {bad}: line 2: missing field 'answer'"):
        load_tasks(cfg)
    cfg, _ = load_config(["+eval.tasks={rg:{format:reasoning_gym,tasks:[no_such_puzzle]}}"])
    with pytest.raises(EvalError, match=r"eval.tasks.rg: .*unknown task\(s\) \['no_such_puzzle'\]"):
        load_tasks(cfg)
    cfg, _ = load_config([f"+eval.tasks={{m:{{path:{tmp_path / 'missing.jsonl'}}}}}"])
    with pytest.raises(EvalError, match="eval.tasks.m: .*missing.jsonl"):
        load_tasks(cfg)
    with pytest.raises(ConfigError, match=r"eval.pass_k=\[1, 32\]: every k must be between 1 and "
                                          r"eval.num_samples_per_prompt=16"):
        load_config(["eval.pass_k=[1,32]"])
    with pytest.raises(EvalError, match="nothing to evaluate: eval.tasks is empty"):
        load_tasks(load_config(["data.num_validation_prompts=0"])[0])
    with pytest.raises(EvalError, match="not a folder"):
        evaluate_all(load_config([])[0], [str(tmp_path / "nope")])
    partial = tmp_path / "run" / "checkpoints" / "step_000004"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="step_000004 is partial"):
        evaluate_all(load_config([])[0], [str(partial)])
    # a broken model folder after a good one: the good one's results are kept, the broken one is named
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes()[:64] if f.suffix == ".safetensors" else f.read_bytes())
    cfg, _ = load_config(["eval.num_samples_per_prompt=2", "eval.pass_k=[1]", "data.num_validation_prompts=4",
                          "rollout.max_response_length=4"])
    with pytest.raises(EvalError, match=f"checkpoint {broken}: its weights cannot be loaded .*header"):
        evaluate_all(cfg, [str(tiny_model_dir), str(broken)], tmp_path / "partial")
    kept = json.loads((tmp_path / "partial" / "eval.json").read_text())["checkpoints"]
    assert list(kept) == [tiny_model_dir.name] and kept[tiny_model_dir.name]["overall"]["num_prompts"] == 4
    assert main(["eval", str(tiny_model_dir), f"+eval.tasks={{m:{{path:{bad}}}}}", "--tasks", "m,zzz"]) == 2
    assert "unknown task(s) ['zzz']; eval.tasks has: m" in capsys.readouterr().err


def test_later_checkpoints_are_synced_into_the_same_engine(tiny_cfg, tiny_model_dir, tmp_path):
    """A second checkpoint of the same shape is streamed into the running engine (weight-sync path), and
    evaluates exactly as it does in an engine of its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "perturbed"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    cfg, _ = load_config(["eval.num_samples_per_prompt=4", "eval.pass_k=[1,4]", "rollout.max_response_length=6",
                          "data.num_validation_prompts=16", "eval.save_samples=true"])

    def texts(out: Path, label: str) -> list[str]:
        return [json.loads(line)["response"] for line in open(out / "samples" / f"{label}.jsonl")]

    both = evaluate_all(cfg, [str(tiny_model_dir), str(other)], tmp_path / "both")["checkpoints"]
    alone = evaluate_all(cfg, [str(other)], tmp_path / "alone")["checkpoints"]
    assert both[tiny_model_dir.name]["engine"] == "started" and both["perturbed"]["engine"] == "synced"
    assert alone["perturbed"]["engine"] == "started"
    assert texts(tmp_path / "both", "perturbed") == texts(tmp_path / "alone", "perturbed")
    assert texts(tmp_path / "both", "perturbed") != texts(tmp_path / "both", tiny_model_dir.name)
    assert both["perturbed"]["overall"] == alone["perturbed"]["overall"]
