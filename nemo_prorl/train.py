"""Build every part of a run from the config and train."""

from __future__ import annotations

import logging
import random
from pathlib import Path
import json
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.data import DATA_SOURCES
from nemo_prorl.data.templates import apply_chat_template_choice
from nemo_prorl.policy import POLICY_BACKENDS
from nemo_prorl.rollout import ROLLOUT_ENGINES
from nemo_prorl.trainer.checkpoint import CONFIG_FILE, CheckpointError, list_checkpoints, verify_checkpoint
from nemo_prorl.trainer.grpo import ProRLTrainer
from nemo_prorl.trainer.report import before_after_table, plot_curves, read_metrics
from nemo_prorl.trainer.trackers import require_packages
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


# Settings a checkpoint's state depends on: resuming under other values cannot load it (the optimizer
# and reference state are laid out per backend and per rank). Model shape is compared on config.json.
LAYOUT_KEYS = ("policy.backend", "policy.megatron.tensor_parallel_size", "policy.megatron.pipeline_parallel_size",
               "policy.megatron.virtual_pipeline_parallel_size", "policy.megatron.data_parallel_size",
               "policy.megatron.use_distributed_optimizer")
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def resolve_resume(cfg: ProRLConfig) -> Optional[Path]:
    """The checkpoint to continue from, verified; None for a fresh start."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(Path(cfg.trainer.output_dir) / "checkpoints")
        if not found:
            log.info("resume=auto: no checkpoint under %s, starting fresh", cfg.trainer.output_dir)
            return None
        path = found[-1]
    else:
        path = Path(cfg.resume).expanduser()
    verify_checkpoint(path)
    return path


def check_resumable(ckpt: Path, resolved: DictConfig, model_dir: Path) -> None:
    """Fail at launch, listing every differing key, when the checkpoint cannot continue under this config."""
    try:
        saved = OmegaConf.load(ckpt / CONFIG_FILE)
    except Exception as e:  # yaml and OmegaConf raise several types
        raise CheckpointError(f"resume: checkpoint {ckpt} is corrupt: {CONFIG_FILE} cannot be read ({e})") from e
    diffs = []
    keys = LAYOUT_KEYS if "megatron" in (saved.policy.backend, resolved.policy.backend) else LAYOUT_KEYS[:1]
    for key in keys:
        a, b = OmegaConf.select(saved, key), OmegaConf.select(resolved, key)
        if a != b:
            diffs.append(f"{key}: checkpoint {a!r}, now {b!r}")
    old_shape, new_shape = (json.loads((d / "config.json").read_text()) for d in (ckpt, model_dir))
    for key in SHAPE_KEYS:
        if old_shape.get(key) != new_shape.get(key):
            diffs.append(f"model {key}: checkpoint {old_shape.get(key)!r}, now {new_shape.get(key)!r}")
    if diffs:
        raise CheckpointError(f"resume: {ckpt} does not fit this config:\n  " + "\n  ".join(diffs) +
                              "\nresume with the checkpoint's values, or convert it first (prorl convert)")


def build_trainer(cfg: ProRLConfig, resolved: DictConfig) -> ProRLTrainer:
    if cfg.cluster.num_threads:
        torch.set_num_threads(cfg.cluster.num_threads)
    seed_everything(cfg.trainer.seed)
    require_packages(cfg)  # logger.wandb/mlflow enabled without their package: fail here, naming the extra
    resume = resolve_resume(cfg)
    model_dir = resolve_model_dir(cfg)
    if resume is not None:
        check_resumable(resume, resolved, model_dir)
        log.info("resuming from %s", resume)
        model_dir = resume  # a checkpoint is a Hugging Face folder of the trained weights
    tokenizer = apply_chat_template_choice(AutoTokenizer.from_pretrained(model_dir), cfg.data.prompt.chat_template)
    policy = POLICY_BACKENDS.get(cfg.policy.backend, "policy.backend")(cfg, model_dir)
    engine = None
    try:  # worker and engine processes must not outlive a failed start
        engine = ROLLOUT_ENGINES.get(cfg.rollout.engine, "rollout.engine")(cfg, model_dir)
        sync_weights(policy, engine, bucket_mb=cfg.rollout.weight_sync_bucket_mb)  # one source of truth from step 0
        source = DATA_SOURCES.get(cfg.data.source, "data.source")(cfg)
        trainer = ProRLTrainer(cfg, resolved, policy=policy, engine=engine, tokenizer=tokenizer, source=source,
                               out_dir=Path(cfg.trainer.output_dir))
        if resume is not None:
            try:
                trainer.restore(resume)
            except BaseException:
                trainer.rewards.close()  # its workers (actors on a cluster) must not outlive the start
                raise
        return trainer
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
