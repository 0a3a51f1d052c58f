"""Supervised warm start of the tiny model on the demo task's warm-start split, cached on disk.

RL needs a policy that sometimes succeeds; ProRL starts from DeepSeek-R1-Distill-Qwen-1.5B, and the
embedded demo starts from a few hundred SFT steps instead. The result depends only on the config keys
hashed below, so a second `make run` finds it and skips training."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch

from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.data.synthetic import TASKS, problems, to_record
from nemo_prorl.demo.tiny import build_tiny_model, train_tokenizer

log = logging.getLogger(__name__)
VERSION = 1  # bump when the warm-start procedure changes, to invalidate old caches


def cache_key(cfg: ProRLConfig) -> str:
    ws = dataclasses.asdict(cfg.model.warm_start)
    ws.pop("cache_dir")
    tiny = dataclasses.asdict(cfg.model.tiny)
    if tiny["architecture"] == "qwen2":  # the fields Qwen3/Qwen3-MoE added: a Qwen2's key (and cache) stays as it was
        for name in ("architecture", "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            tiny.pop(name)
    payload = {
        "version": VERSION,
        "tiny": tiny,
        "warm_start": ws,
        "task": dataclasses.asdict(cfg.data.synthetic),
        "data_seed": cfg.data.seed,
        "seed": cfg.trainer.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _examples(cfg: ProRLConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) pairs from the warm-start split; a `1 - teacher_accuracy` share of the
    answers are the sloppy teacher's (for reverse/sort it echoes the input)."""
    stream = problems(cfg.data.synthetic, cfg.data.seed, "warmstart")
    rng = random.Random(cfg.data.seed + 7)
    out = []
    for _ in range(cfg.model.warm_start.num_examples):
        index, name, prob = next(stream)
        answer = prob.answer if rng.random() < cfg.model.warm_start.teacher_accuracy else prob.sloppy_answer
        rec = to_record(index, name, prob, "warmstart")
        prompt = tokenizer.apply_chat_template(list(rec.messages), add_generation_prompt=True, tokenize=False)
        out.append((tokenizer.encode(prompt), tokenizer.encode(answer) + [tokenizer.eos_token_id]))
    return out


def _sft(model, examples, cfg: ProRLConfig, pad_id: int) -> list[float]:
    ws = cfg.model.warm_start
    opt = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ws.lr, total_steps=max(ws.steps, 1), pct_start=0.1)
    rng = random.Random(cfg.trainer.seed)
    model.train()
    losses = []
    for _ in range(ws.steps):
        batch = rng.sample(examples, min(ws.batch_size, len(examples)))
        L = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), L), pad_id)
        labels = torch.full((len(batch), L), -100)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(r)  # loss on the answer only
            mask[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def warm_started_model(cfg: ProRLConfig) -> Path:
    """Path of the warm-started tiny model (safetensors + tokenizer), training it if not cached."""
    root = Path(os.path.expanduser(cfg.model.warm_start.cache_dir))
    path = root / f"tiny-qwen2-{cache_key(cfg)}"
    if (path / "model.safetensors").is_file():
        log.info("warm start: using cached model %s", path)
        return path
    t0 = time.perf_counter()
    corpus_rng = random.Random(cfg.data.seed)
    corpus = ["user\nassistant\n"]  # the chat template's words; its special tokens are added whole
    for _ in range(2000):
        for make in TASKS.names():  # every task, whichever the run uses, so one tokenizer serves all
            prob = TASKS.get(make)(corpus_rng, cfg.data.synthetic)
            corpus.append(f"{prob.prompt}\n{prob.answer}\n")
    tokenizer = train_tokenizer(corpus, cfg.model.tiny.vocab_size)
    model = build_tiny_model(cfg.model.tiny, tokenizer, seed=cfg.trainer.seed)
    losses = _sft(model, _examples(cfg, tokenizer), cfg, tokenizer.pad_token_id) if cfg.model.warm_start.enabled else []
    tmp = root / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "warm_start.json").write_text(json.dumps({"losses": losses, "seconds": time.perf_counter() - t0}))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache entry behind
    log.info("warm start: %d SFT steps in %.1fs, final loss %.3f -> %s", len(losses),
             time.perf_counter() - t0, losses[-1] if losses else float("nan"), path)
    return path
