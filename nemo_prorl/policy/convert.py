"""`prorl convert`: Hugging Face <-> Megatron-core checkpoints for Qwen2, Llama, Qwen3 and Qwen3-MoE, in
both directions.

  prorl convert hf-to-megatron HF_DIR OUT_DIR --tp 2 --pp 2 [--ep 2 [--etp 1]]
  prorl convert megatron-to-hf MEGATRON_DIR OUT_DIR

The Megatron side is megatron's legacy layout, which Megatron-LM and NeMo 1 load:
OUT_DIR/release/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt with {"model": state dict}, plus
latest_checkpointed_iteration.txt ("release"). With expert parallelism (--ep > 1) every file is
mp_rank_{tp:02d}[_{pp:03d}]_{ep:03d} and holds the dense shard of its TP rank and the experts of its EP rank,
split over expert-TP = TP, as Megatron-LM names them. Expert-TP other than TP has no legacy layout (a file
per rank would need Megatron's rank-to-expert-rank map): the dense shards then hold no experts, and each
expert shard is release/experts_rank_{etp:02d}_{pp:03d}_{ep:03d}/model_optim_rng.pt, which this command
reads back. The HF config and tokenizer travel in OUT_DIR/hf/, and
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
from typing import Any, Optional

import torch

from nemo_prorl.policy.megatron_convert import ModelShape, hf_to_megatron, lazy_hf_weights, megatron_to_hf

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "generation_config.json", "chat_template.jinja")


def _rank_dir(root: Path, tp_rank: int, pp_rank: int, pp: int, ep_rank: Optional[int] = None) -> Path:
    """Megatron-LM's legacy names (get_checkpoint_name): the pipeline rank appears with PP > 1, the expert
    rank (EP > 1) after it."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return root / "release" / (name + (f"_{ep_rank:03d}" if ep_rank is not None else ""))


def _experts_dir(root: Path, etp_rank: int, pp_rank: int, ep_rank: int) -> Path:
    return root / "release" / f"experts_rank_{etp_rank:02d}_{pp_rank:03d}_{ep_rank:03d}"


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def _save(shard: dict[str, torch.Tensor], d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model": shard, "checkpoint_version": 3.0, "iteration": 0}, d / "model_optim_rng.pt")


def _load(d: Path) -> dict[str, torch.Tensor]:
    f = d / "model_optim_rng.pt"
    try:
        return torch.load(f, map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # a missing or truncated shard: name it
        raise RuntimeError(f"{f}: cannot read Megatron shard ({type(e).__name__}: {e})") from e


def hf_to_megatron_dir(hf_dir: Path, out: Path, *, tp: int, pp: int, vocab_multiple: int = 128, ep: int = 1,
                       etp: Optional[int] = None) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    shape = ModelShape.from_hf_config(config)
    weights = lazy_hf_weights(hf_dir)
    etp = tp if etp is None else etp
    if not shape.is_moe and (ep != 1 or etp != tp):
        raise ValueError(f"--ep {ep} / --etp {etp}: {hf_dir} is a dense model ({config.model_type}), it has no experts")
    common = dict(tp=tp, pp=pp, vocab_multiple=vocab_multiple, ep=ep, etp=etp)
    for p in range(pp):
        for t in range(tp):
            if etp != tp:  # dense shards without experts, expert shards below
                shard = hf_to_megatron(weights, shape, tp_rank=t, pp_rank=p, etp_rank=0, **common)
                _save({k: v for k, v in shard.items() if not _is_expert(k)}, _rank_dir(out, t, p, pp))
                continue
            for e in range(ep):
                shard = hf_to_megatron(weights, shape, tp_rank=t, pp_rank=p, ep_rank=e, **common)
                _save(shard, _rank_dir(out, t, p, pp, e if ep > 1 else None))
        for e in range(ep) if etp != tp else ():
            for r in range(etp):
                shard = hf_to_megatron(weights, shape, tp_rank=0, pp_rank=p, ep_rank=e, etp_rank=r, **common)
                _save({k: v for k, v in shard.items() if _is_expert(k)}, _experts_dir(out, r, p, e))
    (out / "latest_checkpointed_iteration.txt").write_text("release")
    (out / "hf").mkdir(exist_ok=True)
    config.save_pretrained(out / "hf")
    for name in _TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / "hf" / name)
    (out / "prorl_convert.json").write_text(json.dumps({"tp": tp, "pp": pp, "vocab_multiple": vocab_multiple,
                                                        "ep": ep, "etp": etp}))


def megatron_to_hf_dir(meg_dir: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig

    meta_file = meg_dir / "prorl_convert.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: not found (was {meg_dir} written by `prorl convert hf-to-megatron`?)")
    meta = json.loads(meta_file.read_text())
    tp, pp = meta["tp"], meta["pp"]
    ep, etp = meta.get("ep", 1), meta.get("etp", tp)  # folders written before MoE support: dense, EP 1
    config = AutoConfig.from_pretrained(meg_dir / "hf")
    shards: list[list[dict[str, torch.Tensor]]] = []
    experts: Optional[list[list[list[dict[str, torch.Tensor]]]]] = None
    if etp != tp:
        shards = [[_load(_rank_dir(meg_dir, t, p, pp)) for t in range(tp)] for p in range(pp)]
        experts = [[[_load(_experts_dir(meg_dir, r, p, e)) for r in range(etp)] for e in range(ep)] for p in range(pp)]
    elif ep > 1:  # every EP rank's file holds the same dense shard: the first one's is read
        files = [[[_load(_rank_dir(meg_dir, t, p, pp, e)) for t in range(tp)] for e in range(ep)] for p in range(pp)]
        shards, experts = [stage[0] for stage in files], files
    else:
        shards = [[_load(_rank_dir(meg_dir, t, p, pp)) for t in range(tp)] for p in range(pp)]
    hf = megatron_to_hf(shards, ModelShape.from_hf_config(config), experts)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in _TOKENIZER_FILES:
        if (meg_dir / "hf" / name).is_file():
            shutil.copy2(meg_dir / "hf" / name, out / name)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron-core layouts")
    csub = p.add_subparsers(dest="direction", required=True)
    a = csub.add_parser("hf-to-megatron",
                        help="shard a Hugging Face Qwen2/Llama/Qwen3/Qwen3-MoE folder for TP x PP (x EP)")
    a.add_argument("src", type=Path)
    a.add_argument("dst", type=Path)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--ep", type=int, default=1, help="expert parallelism (MoE): each EP rank holds E/EP whole experts")
    a.add_argument("--etp", type=int, default=None, help="expert tensor parallelism (MoE; default: = --tp)")
    a.add_argument("--vocab-multiple", type=int, default=128, help="make_vocab_size_divisible_by")
    b = csub.add_parser("megatron-to-hf", help="gather Megatron shards back into a Hugging Face folder")
    b.add_argument("src", type=Path)
    b.add_argument("dst", type=Path)


def run(args: argparse.Namespace) -> int:
    if args.direction == "hf-to-megatron":
        hf_to_megatron_dir(args.src, args.dst, tp=args.tp, pp=args.pp, vocab_multiple=args.vocab_multiple, ep=args.ep,
                           etp=args.etp)
    else:
        megatron_to_hf_dir(args.src, args.dst)
    print(f"wrote {args.dst}")
    return 0
