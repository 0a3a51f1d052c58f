"""`prorl convert`: Hugging Face <-> Megatron-core checkpoints for Qwen2 and Llama, in both directions.

  prorl convert hf-to-megatron HF_DIR OUT_DIR --tp 2 --pp 2
  prorl convert megatron-to-hf MEGATRON_DIR OUT_DIR

The Megatron side is megatron's legacy layout, which Megatron-LM and NeMo 1 load:
OUT_DIR/release/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt with {"model": state dict}, plus
latest_checkpointed_iteration.txt ("release"). The HF config and tokenizer travel in OUT_DIR/hf/, and
prorl_convert.json records the layout, so the way back needs no arguments. We use our own tensor mapping
(policy/megatron_convert.py) rather than Megatron-Bridge: megatron-bridge 0.3.1 requires mamba-ssm (a
CUDA build that fails without a GPU toolchain) and Transformer Engine, and pins transformers 4.57 below
ours. The mapping is the one the trainer itself loads and exports weights with, tested both ways.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from nemo_prorl.policy.megatron_convert import ModelShape, hf_to_megatron, lazy_hf_weights, megatron_to_hf

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "generation_config.json", "chat_template.jinja")


def _rank_dir(root: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return root / "release" / name


def hf_to_megatron_dir(hf_dir: Path, out: Path, *, tp: int, pp: int, vocab_multiple: int = 128) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    shape = ModelShape.from_hf_config(config)
    weights = lazy_hf_weights(hf_dir)
    for p in range(pp):
        for t in range(tp):
            d = _rank_dir(out, t, p, pp)
            d.mkdir(parents=True, exist_ok=True)
            shard = hf_to_megatron(weights, shape, tp_rank=t, tp=tp, pp_rank=p, pp=pp, vocab_multiple=vocab_multiple)
            torch.save({"model": shard, "checkpoint_version": 3.0, "iteration": 0}, d / "model_optim_rng.pt")
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    (out / "hf").mkdir(exist_ok=True)
    config.save_pretrained(out / "hf")
    for name in _TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / "hf" / name)
    (out / "prorl_convert.json").write_text(json.dumps({"tp": tp, "pp": pp, "vocab_multiple": vocab_multiple}))


def megatron_to_hf_dir(meg_dir: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig

    meta_file = meg_dir / "prorl_convert.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: not found (was {meg_dir} written by `prorl convert hf-to-megatron`?)")
    meta = json.loads(meta_file.read_text())
    tp, pp = meta["tp"], meta["pp"]
    config = AutoConfig.from_pretrained(meg_dir / "hf")
    shards = []
    for p in range(pp):
        row = []
        for t in range(tp):
            f = _rank_dir(meg_dir, t, p, pp) / "model_optim_rng.pt"
            try:
                row.append(torch.load(f, map_location="cpu", weights_only=True)["model"])
            except Exception as e:  # a missing or truncated shard: name it
                raise RuntimeError(f"{f}: cannot read Megatron shard ({type(e).__name__}: {e})") from e
        shards.append(row)
    hf = megatron_to_hf(shards, ModelShape.from_hf_config(config))
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in _TOKENIZER_FILES:
        if (meg_dir / "hf" / name).is_file():
            shutil.copy2(meg_dir / "hf" / name, out / name)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron-core layouts")
    csub = p.add_subparsers(dest="direction", required=True)
    a = csub.add_parser("hf-to-megatron", help="shard a Hugging Face Qwen2/Llama folder for TP x PP")
    a.add_argument("src", type=Path)
    a.add_argument("dst", type=Path)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--vocab-multiple", type=int, default=128, help="make_vocab_size_divisible_by")
    b = csub.add_parser("megatron-to-hf", help="gather Megatron shards back into a Hugging Face folder")
    b.add_argument("src", type=Path)
    b.add_argument("dst", type=Path)


def run(args: argparse.Namespace) -> int:
    if args.direction == "hf-to-megatron":
        hf_to_megatron_dir(args.src, args.dst, tp=args.tp, pp=args.pp, vocab_multiple=args.vocab_multiple)
    else:
        megatron_to_hf_dir(args.src, args.dst)
    print(f"wrote {args.dst}")
    return 0
