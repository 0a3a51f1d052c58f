"""Weight sync: reshard a ~0.5B Qwen2 (Qwen2.5-0.5B's shape, random bfloat16 weights) from TP=2 Megatron
shards into the rollout engine, against the physical floor measured in the same script: copying the same
number of bytes once in memory.

    python benchmarks/weight_sync.py                 # the embedded torch engine
    PRORL_VLLM_PYTHON=.venv-vllm/bin/python python benchmarks/weight_sync.py   # and vLLM (make vllm-env)

Targets (issue 6): time within 3x of the floor; peak extra memory no more than one bucket plus one full
parameter. Peak memory is the rise of VmHWM (reset through /proc/PID/clear_refs) over the resident size
before the sync, in the trainer process and, for vLLM, in the engine process."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config

from nemo_prorl.policy.megatron_convert import ModelShape, hf_to_megatron, megatron_to_hf_lazy
from nemo_prorl.rollout.torch_engine import TorchRolloutEngine
from nemo_prorl.weight_sync import load_into_engine
from nemo_prorl.weight_sync.buffer import iter_buckets, pack, packed_size

MB = 2**20
QWEN2_0P5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=True, dtype="bfloat16")


def _status(pid: int | str, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak(pid: int | str = "self") -> int:
    """Reset the process's peak RSS to its current RSS (Linux clear_refs 5) and return that RSS."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return _status(pid, "VmRSS")


def memcpy_floor(nbytes: int, repeats: int = 3) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)  # touched, so page faults do not count
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def make_model(root: Path) -> tuple[Path, ModelShape, list, int, int]:
    """A model folder (for the engine to start from) and the TP=2 shards of *other* weights to sync."""
    from safetensors.torch import save_file

    cfg = Qwen2Config(**QWEN2_0P5B)
    s = ModelShape.from_hf_config(cfg)
    torch.manual_seed(0)
    hf = {k: torch.randn(v.shape, dtype=torch.bfloat16) * 0.02 for k, v in _hf_shapes(s).items()}
    save_file(hf, str(root / "model.safetensors"))
    cfg.save_pretrained(root)
    _tokenizer(root)
    shards = [[hf_to_megatron(hf, s, tp_rank=r, tp=2) for r in range(2)]]
    total = sum(t.numel() * t.element_size() for t in hf.values())
    largest = max(t.numel() * t.element_size() for t in hf.values())
    del hf
    for sd in shards[0]:
        for t in sd.values():
            t.mul_(1.5)  # the synced weights differ from the ones the engine starts with
    return root, s, shards, total, largest


def _hf_shapes(s: ModelShape) -> dict[str, torch.Tensor]:
    """The HF checkpoint's names, as empty meta tensors of the right shapes (no memory)."""
    h, q, kv, f = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.ffn_hidden_size
    sd = {"model.embed_tokens.weight": torch.empty(s.vocab_size, h, device="meta"),
          "model.norm.weight": torch.empty(h, device="meta")}
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        shapes = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                  "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                  "self_attn.v_proj.weight": (kv, h), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                  "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (f, h),
                  "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
        sd.update({p + k: torch.empty(v, device="meta") for k, v in shapes.items()})
    return sd


def _tokenizer(root: Path) -> None:
    from nemo_prorl.demo.tiny import train_tokenizer

    train_tokenizer(["0123456789 abcdefghijklmnopqrstuvwxyz"], 300).save_pretrained(root)


def run(engine, shards, s: ModelShape, bucket_mb: float, engine_pid: int | None = None) -> tuple[float, int, int]:
    """Seconds and peak extra memory of a warm sync (the first one maps the engine's weights in and
    allocates its transfer buffer, which then stays: `buffer_mb` in the table)."""
    load_into_engine(megatron_to_hf_lazy(shards, s), engine, bucket_mb=bucket_mb)
    base = reset_peak()
    base_engine = reset_peak(engine_pid) if engine_pid else 0
    load_into_engine(megatron_to_hf_lazy(shards, s), engine, bucket_mb=bucket_mb)
    extra = _status("self", "VmHWM") - base
    extra_engine = _status(engine_pid, "VmHWM") - base_engine if engine_pid else 0
    best = min(load_into_engine(megatron_to_hf_lazy(shards, s), engine, bucket_mb=bucket_mb).seconds
               for _ in range(2))
    return best, extra, extra_engine


def trainer_side(shards, s: ModelShape, bucket_mb: float) -> tuple[float, int]:
    """Reshard and pack into a transfer buffer only: the trainer's share of a sync into any engine that
    runs in another process (vLLM)."""
    base = reset_peak()
    buf = torch.empty(0, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for bucket in iter_buckets(megatron_to_hf_lazy(shards, s), int(bucket_mb * MB), torch.bfloat16):
            need = packed_size(bucket, torch.bfloat16)
            if buf.numel() < need:
                buf = torch.empty(need, dtype=torch.uint8)
            pack(bucket, buf, torch.bfloat16)
        best = min(best, time.perf_counter() - t0)
    return best, _status("self", "VmHWM") - base


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket-mb", type=float, default=256.0)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        root, s, shards, total, largest = make_model(Path(tmp))
        floor = memcpy_floor(total)
        print(f"Qwen2 {s.num_layers} layers, hidden {s.hidden_size}, vocab {s.vocab_size}: "
              f"{total / MB:.0f} MB of bfloat16 weights from TP=2 shards; bucket {args.bucket_mb:.0f} MB; "
              f"largest parameter {largest / MB:.0f} MB")
        print(f"floor: one in-memory copy of {total / MB:.0f} MB takes {floor:.3f} s ({total / floor / 2**30:.1f} GiB/s)")
        rows = [("trainer side: reshard + pack", *trainer_side(shards, s, args.bucket_mb), 0, 0)]
        eng = TorchRolloutEngine(root, device="cpu", dtype="bfloat16", max_num_seqs=1, pad_token_id=0)
        rows.append(("torch engine (in process)", *run(eng, shards, s, args.bucket_mb), 0))
        del eng
        python = os.environ.get("PRORL_VLLM_PYTHON")
        if python:
            from nemo_prorl.rollout.vllm_engine import VLLMRolloutEngine

            spec = dict(model_dir=str(root), dtype="bfloat16", seed=0, max_model_len=256, tensor_parallel_size=1,
                        enforce_eager=True, enable_prefix_caching=True, max_num_seqs=8, gpu_memory_utilization=0.5,
                        kv_cache_bytes=256 * MB, sleep_mode=False)
            from nemo_prorl.config import load_config

            cfg, _ = load_config(["rollout=vllm", f"trainer.output_dir={tmp}"])
            eng = VLLMRolloutEngine(cfg, spec, python=python, log_path=Path(tmp) / "vllm.log")
            try:
                rows.append(("vLLM engine (Ray actor)", *run(eng, shards, s, args.bucket_mb, eng.pid),
                             eng.staging_buffer(0).numel()))
            finally:
                eng.close()
        else:
            print("(vLLM skipped: set PRORL_VLLM_PYTHON, see make vllm-env)")
        budget = args.bucket_mb * MB + largest
        print(f"\n{'engine':28s} {'seconds':>8s} {'x floor':>8s} {'trainer extra MB':>17s} {'engine extra MB':>16s}"
              f" {'buffer MB':>10s}")
        for name, sec, extra, extra_engine, buf in rows:
            print(f"{name:28s} {sec:8.3f} {sec / floor:8.2f} {extra / MB:17.0f} {extra_engine / MB:16.0f}"
                  f" {buf / MB:10.0f}")
        print(f"targets: <= 3.00 x floor; extra memory <= one bucket + one parameter = {budget / MB:.0f} MB")


if __name__ == "__main__":
    main()
