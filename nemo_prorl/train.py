"""Build every part of a run from the config and train."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from transformers import AutoTokenizer

from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.data import DATA_SOURCES
from nemo_prorl.data.templates import apply_chat_template_choice
from nemo_prorl.policy import POLICY_BACKENDS
from nemo_prorl.rollout import ROLLOUT_ENGINES
from nemo_prorl.trainer.grpo import ProRLTrainer
from nemo_prorl.trainer.report import before_after_table, plot_curves, read_metrics
from nemo_prorl.weight_sync import sync_weights

log = logging.getLogger("nemo_prorl")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_dir(cfg: ProRLConfig) -> Path:
    if cfg.model.path is not None:
        path = Path(cfg.model.path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path={cfg.model.path!r}: no Hugging Face config.json there")
        return path
    from nemo_prorl.demo.warmstart import warm_started_model

    return warm_started_model(cfg)


def build_trainer(cfg: ProRLConfig, resolved: DictConfig) -> ProRLTrainer:
    if cfg.cluster.num_threads:
        torch.set_num_threads(cfg.cluster.num_threads)
    seed_everything(cfg.trainer.seed)
    model_dir = resolve_model_dir(cfg)
    tokenizer = apply_chat_template_choice(AutoTokenizer.from_pretrained(model_dir), cfg.data.prompt.chat_template)
    policy = POLICY_BACKENDS.get(cfg.policy.backend, "policy.backend")(cfg, model_dir)
    engine = None
    try:  # worker and engine processes must not outlive a failed start
        engine = ROLLOUT_ENGINES.get(cfg.rollout.engine, "rollout.engine")(cfg, model_dir)
        sync_weights(policy, engine, bucket_mb=cfg.rollout.weight_sync_bucket_mb)  # one source of truth from step 0
        source = DATA_SOURCES.get(cfg.data.source, "data.source")(cfg)
        return ProRLTrainer(cfg, resolved, policy=policy, engine=engine, tokenizer=tokenizer, source=source,
                            out_dir=Path(cfg.trainer.output_dir))
    except BaseException:
        if engine is not None:
            engine.close()
        policy.close()
        raise


def summarize(cfg: ProRLConfig, result: dict[str, Any]) -> str:
    out_dir = Path(result["out_dir"])
    vals = result["validations"]
    lines = [f"run folder: {out_dir}"]
    if len(vals) >= 2:
        first, last = min(vals), max(vals)
        keys = [f"val/pass@{k}" for k in cfg.validation.pass_k] + ["val/reward", "val/response_length"]
        lines += [f"validation on {cfg.data.num_validation_prompts} held-out prompts, step {first} -> step {last}:",
                  before_after_table(vals[first], vals[last], keys)]
    records = read_metrics(out_dir / "metrics.jsonl")
    train = [r for r in records if "actor/entropy" in r]
    if train:
        lines.append(f"entropy {train[0]['actor/entropy']:.3f} -> {train[-1]['actor/entropy']:.3f}; "
                     f"max KL to reference {max(r.get('actor/kl', 0.0) for r in train):.4f}")
    if cfg.trainer.plot and records:
        png = plot_curves(records, out_dir / "training_curves.png", f"{cfg.experiment_name}: ProRL training")
        lines.append(f"training curves: {png}")
    return "\n".join(lines)


def run_training(cfg: ProRLConfig, resolved: DictConfig) -> dict[str, Any]:
    trainer = build_trainer(cfg, resolved)
    try:
        result = trainer.fit()
    finally:
        trainer.engine.close()
        trainer.policy.close()
    print(summarize(cfg, result), flush=True)
    return result
