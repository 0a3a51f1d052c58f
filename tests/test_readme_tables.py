"""The README's tables of the CPU runs are generated (benchmarks/readme_tables.py), never typed: each block
equals the rendering of its record, each record still describes its preset's scale, and the generator turns
a run's metrics.jsonl into the figures it should."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_tables as rt  # noqa: E402

from nemo_prorl.config.loader import load_config  # noqa: E402

# `make run`'s default and the recipes' miniatures (README "What `make run` shows", "ProRL v2", "BroRL")
EXPECTED_BLOCKS = {"cpu_tiny", "prorl_v2_cpu_tiny", "brorl_cpu_tiny"}


def test_readme_blocks_equal_their_records() -> None:
    assert EXPECTED_BLOCKS <= set(rt.blocks(rt.README.read_text()))
    assert rt.check() == []


@pytest.mark.parametrize("name", sorted(EXPECTED_BLOCKS))
def test_each_record_describes_its_preset_today(name: str) -> None:
    """A preset whose scale changed (steps, batch, validation) makes its README figures stale: redo the run
    (`make readme-tables`)."""
    rec = rt.load_record(name)
    cfg, _ = load_config([f"experiment={rec['experiment']}"])
    for key, want in rec["scale"].items():
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert got == want, f"{name}: {key} is {got} in conf/experiment/{rec['experiment']}.yaml, {want} in the record"


def _fake_run(d: Path) -> Path:
    (d / "checkpoints" / "step_000004").mkdir(parents=True)
    cfg = {"experiment_name": "toy", "trainer": {"num_steps": 4}, "algo": {"num_prompts_per_step": 2,
           "num_generations_per_prompt": 8}, "data": {"num_validation_prompts": 16},
           "validation": {"num_samples_per_prompt": 4, "temperature": 0.6, "pass_k": [1, 4]},
           "rollout": {"max_response_length": 12}}
    (d / "checkpoints" / "step_000004" / "prorl_config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": 0, "val/pass@1": 0.25, "val/pass@4": 0.5}]
    rows += [{"step": s, "actor/entropy": 1.0 - 0.1 * s, "actor/kl": 0.01 * s, "time/step": 2.0,
              "filter/filtered_group_frac": 0.25 * (s % 2)} for s in (1, 2, 3, 4)]
    rows.append({"step": 4, "val/pass@1": 0.8125, "val/pass@4": 0.9375})
    with open(d / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "torn')  # a torn last line is left out
    return d


def test_summary_and_rendering_of_a_run(tmp_path: Path) -> None:
    rec = rt.summarize_run(_fake_run(tmp_path))
    assert rec["validation"] == {"before_step": 0, "after_step": 4, "before": {"pass@1": 0.25, "pass@4": 0.5},
                                 "after": {"pass@1": 0.8125, "pass@4": 0.9375}}
    assert rec["entropy"] == pytest.approx([0.9, 0.6]) and rec["max_kl"] == pytest.approx(0.04)
    assert rec["filtered_frac"] == 0.125
    assert rec["train_seconds"] == 8.0 and rec["seconds_per_step"] == 2.0
    rec["cpu"], rec["commit"] = "Test CPU", "abc1234"
    assert rt.render(rec) == (
        "| validation (16 held-out prompts, 4 samples each) | before | after 4 steps | change |\n"
        "| --- | --- | --- | --- |\n"
        "| pass@1 | 0.250 | 0.812 | +0.562 |\n"
        "| pass@4 | 0.500 | 0.938 | +0.438 |\n"
        "\n"
        "Entropy per token 0.90 -> 0.60, KL to the reference at most 0.04, 12% of groups filtered, 2.00 s per "
        "step, 0 min 8 s of training (2 prompts x 8 samples per step; measured on Test CPU, commit abc1234).\n")


def test_check_catches_a_hand_edit_and_a_run_that_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _fake_run(tmp_path / "run")
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setattr(rt, "RECORDS", records)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- readme-table:toy -->\nold\n<!-- /readme-table:toy -->\nrest\n")
    assert rt.check(readme) == [f"README block 'toy': no record {records / 'toy.json'}"]
    rec = rt.summarize_run(run)
    (records / "toy.json").write_text(json.dumps(rec))
    readme.write_text(rt.write_block(readme.read_text(), "toy", rt.render(rec)))
    assert readme.read_text().startswith("intro\n<!-- readme-table:toy -->\n| validation") and "old" not in readme.read_text()
    assert readme.read_text().endswith("<!-- /readme-table:toy -->\nrest\n")
    assert rt.check(readme, runs={"toy": run}) == []
    readme.write_text(readme.read_text().replace("0.812", "0.800"))  # typed by hand
    assert rt.check(readme) == ["README block 'toy' differs from " + str(records / "toy.json") + " (run `record` again)"]
    log = run / "metrics.jsonl"  # the run now ends elsewhere than the record says
    log.write_text(log.read_text().rsplit("\n", 1)[0] + '\n{"step": 5, "val/pass@1": 0.5, "val/pass@4": 0.5}\n')
    assert any(p.startswith("toy: validation of") for p in rt.check(readme, runs={"toy": run}))
