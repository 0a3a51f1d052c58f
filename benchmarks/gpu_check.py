"""The prepared GPU check (issue 19): what must work on a CUDA machine, and its figures, in one run of at most
8 minutes on one H100/H200. Started by `benchmarks/gpu_check.sh` (which installs the pure-Python
dependencies from `benchmarks/wheels` first); writes `gpu_check.json`.

Sections, each in its own process (a crash or a CUDA error in one leaves the others' figures) with its
own time limit:
  env             GPU, compute capability, torch/CUDA/TE/megatron-core versions, the bf16 dense peak used for MFU
  embedded        a few steps of the embedded run (hf policy + torch engine) on CUDA in bf16: an update taken
  megatron_local  the Megatron backend at TP=1 with the local layer spec: logprobs and a training step
  megatron_te     the same with Transformer Engine's layer spec and FP8 (hybrid), where TE and cc >= 8.9 exist
  mfu_0p5b        a ~0.5B Qwen2 shape (Qwen2.5-0.5B's) with random weights, Megatron TP=1 (TE where present):
                  tokens/s and model FLOPs utilisation of a training step against the GPU's dense bf16 peak
  weight_sync     the 0.5B weights packed into a CUDA transfer buffer and loaded by a torch engine in another
                  process through CUDA IPC, against one device-to-device copy of the same bytes (the floor)

    python benchmarks/gpu_check.py [--out DIR] [--device cuda|cpu] [--quick] [--sections a,b]

Without a GPU it says so and exits 0 (unless --device cpu: the sections' logic on tiny shapes, as CI runs it).
MFU counts 6 FLOPs per parameter per token (forward and backward; embedding lookups excluded, the output
layer included) plus attention's 6 * layers * hidden * sequence length per token (causal: half of 12).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN2_0P5B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True)
TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
# Qwen3-MoE shapes (issue 30): every layer MoE, top-k renormalised (Qwen3-30B-A3B's layout, scaled down)
TINY_MOE = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                max_position_embeddings=1024, norm_topk_prob=True, tie_word_embeddings=False)
MOE_SMALL = dict(TINY_MOE, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=8)
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, by device-name fragment.
# The first fragment that matches wins: more specific names first.
BF16_PEAK_TFLOPS = [("H200 NVL", 835.0), ("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                    ("H100", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
                    ("A10", 125.0)]
TIME_LIMITS_S = {"env": 45, "embedded": 120, "megatron_local": 75, "megatron_te": 75, "mfu_0p5b": 100,
                 "weight_sync": 75, "moe": 60, "moe_te": 60}
DEADLINE_S = 480  # the whole check (issue 19: at most 8 minutes); a section never runs past it
SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {}


def section(fn: Callable[[argparse.Namespace], dict[str, Any]]) -> Callable:
    SECTIONS[fn.__name__] = fn
    return fn


class Skipped(Exception):
    """A section that does not apply to this machine (no Transformer Engine, FP8 unsupported)."""


def _dtype(args: argparse.Namespace) -> str:
    return "bfloat16" if args.device == "cuda" else "float32"


def _sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_tflops(name: str) -> float | None:
    return next((v for frag, v in BF16_PEAK_TFLOPS if frag in name), None)


@section
def env(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        out.update(gpu=name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                   bf16_peak_tflops=peak_tflops(name))
    for mod in ("transformer_engine", "megatron.core", "transformers", "apex"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "importable")
        except Exception as e:  # noqa: BLE001
            out[mod] = f"absent ({type(e).__name__})"
    return out


@section
def embedded(args: argparse.Namespace) -> dict[str, Any]:
    """`make run`'s configuration for a few steps on this device: it must take updates."""
    from nemo_prorl.config import load_config
    from nemo_prorl.train import run_training

    run = Path(args.out) / "embedded"
    overrides = [f"cluster.device={args.device}", f"model.dtype={_dtype(args)}", "trainer.num_steps=4",
                 *(["cluster.gpus_per_node=1"] if args.device == "cuda" else []),
                 f"trainer.output_dir={run}", "trainer.progress_bar=false", "trainer.plot=false",
                 "trainer.tensorboard=false", "trainer.checkpoint_every_n_steps=1000", "validation.every_n_steps=1000"]
    if args.quick:
        overrides += ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=2",
                      "model.warm_start.steps=20", "model.warm_start.num_examples=256", "algo.num_prompts_per_step=4",
                      "algo.num_generations_per_prompt=4", "algo.num_prompts_per_minibatch=2",
                      "rollout.max_response_length=6", "reward.overlong.enabled=true",
                      "reward.overlong.buffer_length=4", "trainer.num_steps=2",
                      f"model.warm_start.cache_dir={Path(args.out) / 'warmstart'}"]
    cfg, resolved = load_config(overrides)
    t0 = time.perf_counter()
    run_training(cfg, resolved)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "time/step" in r]
    updates = sum(1 for r in steps if r.get("actor/grad_norm", 0.0) > 0 and not r.get("actor/update_skipped"))
    if not updates:
        raise RuntimeError("no update was taken in the embedded run")
    return {"steps": len(steps), "updates_taken": updates, "wall_s": round(wall, 1),
            "step_s_mean": round(sum(r["time/step"] for r in steps) / len(steps), 3),
            "gen_tokens_per_s": round(sum(r.get("throughput/gen_tokens_per_s", 0.0) for r in steps) / len(steps)),
            "reward_mean_last": steps[-1].get("reward/mean")}


def _model_dir(shape: dict, dtype: str) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    d = Path(tempfile.mkdtemp(prefix="prorl-gpu-check-"))  # under TMPDIR; removed when this process exits
    atexit.register(shutil.rmtree, d, True)
    torch.manual_seed(0)
    config, model = (Qwen3MoeConfig, Qwen3MoeForCausalLM) if "num_experts" in shape else (Qwen2Config, Qwen2ForCausalLM)
    model(config(**shape, dtype=dtype)).to(getattr(torch, dtype)).save_pretrained(d)
    return d


def _batch(rows: int, vocab: int, prompt: tuple[int, int], response: tuple[int, int]) -> dict:
    import torch

    from nemo_prorl.rollout.base import Completion
    from nemo_prorl.trainer.batching import build_batch

    g = torch.Generator().manual_seed(0)
    n_prompts = max(1, rows // 8)
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(prompt[0], prompt[1], (n_prompts,), generator=g)]
    comps = [Completion(prompt_index=i % n_prompts, token_ids=torch.randint(0, vocab, (int(n),), generator=g).tolist(),
                        logprobs=[0.0] * int(n), finish_reason="stop")
             for i, n in enumerate(torch.randint(response[0], response[1], (rows,), generator=g))]
    comps.sort(key=lambda c: c.prompt_index)
    batch = build_batch(prompts, comps, pad_token_id=0)
    batch["advantages"] = torch.randn(rows, generator=g)
    return batch


def _megatron_run(args: argparse.Namespace, shape: dict, *, te: bool, fp8: bool, rows: int,
                  lengths: tuple[tuple[int, int], tuple[int, int]], repeats: int, replay: bool = False) -> dict[str, Any]:
    """One Megatron rank (TP=1) in this process: logprobs and training steps on a random batch (with
    `replay`, a MoE model's steps are timed again replaying random routed experts, as rollout.routing_replay
    does: `replay_train_step_s`)."""
    import functools

    import torch

    from nemo_prorl.config.schema import MegatronConfig, OptimConfig
    from nemo_prorl.policy.megatron_worker import MegatronWorker, WorkerSpec
    from nemo_prorl.trainer.grpo import microbatch_loss

    model_dir = _model_dir(shape, _dtype(args))
    m = MegatronConfig(transformer_impl="transformer_engine" if te else "local", fp8="hybrid" if fp8 else None,
                       micro_batch_tokens=16384, logprob_micro_batch_tokens=32768)
    spec = WorkerSpec(rank=0, world_size=1, model_dir=str(model_dir), megatron=m, optim=OptimConfig(),
                      dtype=_dtype(args), seed=0, use_reference=False, num_threads=0)
    worker = MegatronWorker(spec, torch.distributed.HashStore())  # one rank in this process: no rendezvous
    batch = _batch(rows, shape["vocab_size"], *lengths)
    tokens = int(batch["attention_mask"].sum())
    loss = functools.partial(microbatch_loss, clip_eps_low=0.2, clip_eps_high=0.4, clip_ratio_c=None,
                             global_num_tokens=batch["response_mask"].sum(), global_num_seqs=float(rows),
                             horizon=lengths[1][1], loss_agg_mode="token-mean", kl_coef=0.0, kl_estimator="k3",
                             entropy_coef=0.0)
    lp = worker.logprobs(batch, 1.0, False)
    if lp is None or not bool(torch.isfinite(lp).all()):
        raise RuntimeError("non-finite logprobs")
    worker.train_minibatch(batch, loss, 1.0, 1e-6)  # warm-up (kernels, FP8 scales)
    _sync(args)
    t = time.perf_counter()
    for _ in range(repeats):
        metrics = worker.train_minibatch(batch, loss, 1.0, 1e-6)
    _sync(args)
    dt = (time.perf_counter() - t) / repeats
    if metrics.get("update_skipped") or not torch.isfinite(torch.tensor(float(metrics["grad_norm"]))):
        raise RuntimeError(f"the training step was skipped (grad norm {metrics['grad_norm']})")
    extra = {}
    if replay:
        b, t = batch["input_ids"].shape
        g = torch.Generator().manual_seed(1)
        order = torch.rand(b, t, shape["num_hidden_layers"], shape["num_experts"], generator=g).argsort(-1)
        replayed = dict(batch, routed_experts=order[..., : shape["num_experts_per_tok"]].to(torch.uint8))
        worker.train_minibatch(replayed, loss, 1.0, 1e-6)
        _sync(args)
        t = time.perf_counter()
        for _ in range(repeats):
            worker.train_minibatch(replayed, loss, 1.0, 1e-6)
        _sync(args)
        extra["replay_train_step_s"] = round((time.perf_counter() - t) / repeats, 4)
    mean_len = tokens / rows
    return {**extra, "tokens": tokens, "train_step_s": round(dt, 4), "train_tokens_per_s": round(tokens / dt),
            "grad_norm": round(float(metrics["grad_norm"]), 4), "mean_seq_len": round(mean_len, 1),
            "params": sum(p.numel() for p in worker.model[0].parameters()), "transformer_engine": worker.te}


def _flops_per_token(shape: dict, seq: float) -> float:
    h, layers, inter, v = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o, k, v projections and the gated MLP
    return 6.0 * (layers * per_layer + h * v) + 6.0 * layers * h * seq


@section
def megatron_local(args: argparse.Namespace) -> dict[str, Any]:
    return _megatron_run(args, TINY if args.quick else dict(TINY, hidden_size=512, num_hidden_layers=4,
                                                             intermediate_size=1536, num_attention_heads=8),
                         te=False, fp8=False, rows=16, lengths=((16, 64), (16, 128)), repeats=2)


@section
def megatron_te(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise Skipped(f"Transformer Engine is not importable: {type(e).__name__}: {e}") from e
    fp8 = args.device == "cuda" and torch.cuda.get_device_capability(0) >= (8, 9)
    out = _megatron_run(args, dict(TINY, hidden_size=512, num_hidden_layers=4, intermediate_size=1536,
                                   num_attention_heads=8), te=True, fp8=fp8, rows=16,
                        lengths=((16, 64), (16, 128)), repeats=2)
    return dict(out, fp8=fp8)


@section
def mfu_0p5b(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    shape = TINY if args.quick else QWEN2_0P5B
    te = False
    try:
        import transformer_engine.pytorch  # noqa: F401
        te = args.device == "cuda"
    except Exception:  # noqa: BLE001
        pass
    rows, lengths = (8, ((16, 32), (16, 64))) if args.quick else (64, ((128, 512), (256, 1536)))
    out = _megatron_run(args, shape, te=te, fp8=False, rows=rows, lengths=lengths, repeats=1 if args.quick else 3)
    flops = _flops_per_token(shape, out["mean_seq_len"]) * out["train_tokens_per_s"]
    peak = peak_tflops(torch.cuda.get_device_name(0)) if args.device == "cuda" else None
    return dict(out, model_tflops=round(flops / 1e12, 2), mfu=round(flops / (peak * 1e12), 4) if peak else None)


def _moe_run(args: argparse.Namespace, *, te: bool) -> dict[str, Any]:
    shape = TINY_MOE if args.quick else MOE_SMALL
    rows, lengths = (8, ((8, 16), (8, 32))) if args.quick else (32, ((64, 256), (128, 768)))
    return _megatron_run(args, shape, te=te, fp8=False, rows=rows, lengths=lengths, repeats=1 if args.quick else 2,
                         replay=True)


@section
def moe(args: argparse.Namespace) -> dict[str, Any]:
    """A Qwen3-MoE rank (issue 30), experts one by one (the local spec): training step time, and with
    routing replay."""
    out = _moe_run(args, te=False)
    return dict(out, replay_x_plain=round(out["replay_train_step_s"] / out["train_step_s"], 2))


@section
def moe_te(args: argparse.Namespace) -> dict[str, Any]:
    """The same rank under Transformer Engine's layer spec: the experts as one grouped GEMM (compare with
    section moe's train_step_s), and TE's fused-norm names loaded and exported by the worker."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise Skipped(f"Transformer Engine is not importable: {type(e).__name__}: {e}") from e
    out = _moe_run(args, te=True)
    return dict(out, replay_x_plain=round(out["replay_train_step_s"] / out["train_step_s"], 2))


def _engine_child(conn: Any, model_dir: str, device: str, dtype: str) -> None:
    """The rollout engine's process: maps the trainer's transfer buffer and loads what it is told."""
    import types

    from nemo_prorl.rollout.torch_engine import TorchRolloutEngine
    from nemo_prorl.rollout.vllm_server import buffer_views, finish_reads

    engine = TorchRolloutEngine(Path(model_dir), device=device, dtype=dtype, max_num_seqs=8, pad_token_id=0)
    holder = types.SimpleNamespace()
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        handle, metas = msg
        weights = buffer_views(holder, handle, metas)
        engine.load_weights(weights)
        finish_reads(handle)
        conn.send(len(weights))
    conn.send(_checksum(dict(engine.model.state_dict())))


def _checksum(state: dict) -> float:
    """Sum over every tensor (tied weights once), in float64."""
    seen, total = set(), 0.0
    for t in state.values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += float(t.double().sum())
    return total


@section
def weight_sync(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing as mp

    import torch

    from nemo_prorl.policy.base import LazyWeight
    from nemo_prorl.weight_sync.buffer import TransferBuffer, iter_buckets, pack, packed_size

    shape = TINY if args.quick else QWEN2_0P5B
    dtype = _dtype(args)
    model_dir = _model_dir(shape, dtype)
    from safetensors.torch import load_file

    # the trainer's weights differ from what the engine loaded at start: a sync that did nothing fails
    state = {k: (v.float() + 0.5).to(getattr(torch, dtype)).to(args.device)
             for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_engine_child, args=(child, str(model_dir), args.device, dtype), daemon=True)
    proc.start()
    try:
        if not parent.poll(120) or parent.recv() != "ready":
            raise RuntimeError("the engine process did not start")
        buf = TransferBuffer(torch.device(args.device))
        weights = [LazyWeight(k, (v,)) for k, v in state.items()]
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        _sync(args)
        t = time.perf_counter()
        loaded = 0
        for bucket in iter_buckets(weights, 256 << 20, getattr(torch, dtype)):
            items = pack(bucket, buf.ensure(packed_size(bucket)), getattr(torch, dtype))
            buf.ready()
            parent.send((buf.handle, buf.metas(items)))
            loaded += parent.recv()
        sync_s = time.perf_counter() - t
        parent.send(None)
        checksum = parent.recv()
        flat = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
        src = torch.cat([v.reshape(-1).view(torch.uint8) for v in state.values()])
        _sync(args)
        t = time.perf_counter()
        flat.copy_(src)
        _sync(args)
        floor_s = time.perf_counter() - t
        buf.close()
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    expect = _checksum(state)
    if loaded != len(state) or abs(checksum - expect) > 1e-6 * max(1.0, abs(expect)):
        raise RuntimeError(f"the engine loaded {loaded}/{len(state)} tensors, checksum {checksum} != {expect}")
    return {"megabytes": round(nbytes / 2**20, 1), "sync_s": round(sync_s, 4), "floor_copy_s": round(floor_s, 5),
            "x_floor": round(sync_s / floor_s, 1) if floor_s > 0 else None,
            "transport": "cuda ipc" if args.device == "cuda" else "shared memory file"}


def run_section(args: argparse.Namespace) -> int:
    try:
        result = {"status": "ok", **SECTIONS[args.section](args)}
    except Skipped as e:
        result = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001  recorded for the report
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    Path(args.out, f"{args.section}.json").write_text(json.dumps(result, indent=1))
    return 0


def gpu_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU test of this script's logic)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # one section, in a child process
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.section:
        return run_section(args)
    if args.device == "cuda" and not gpu_present():
        print("gpu_check: no CUDA GPU on this machine; nothing to check (exit 0)")
        return 0
    report: dict[str, Any] = {"device": args.device, "quick": args.quick, "sections": {}}
    t_all = time.perf_counter()
    deadline = time.monotonic() + (DEADLINE_S * 4 if args.device == "cpu" else DEADLINE_S)
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        Path(args.out, f"{name}.json").unlink(missing_ok=True)  # never a previous run's result
        cmd = [sys.executable, __file__, "--section", name, "--out", args.out, "--device", args.device] + \
            (["--quick"] if args.quick else [])
        limit = min(TIME_LIMITS_S[name] * (4 if args.device == "cpu" else 1), int(deadline - time.monotonic()))
        if limit <= 0:
            report["sections"][name] = {"status": "failed", "error": "no time left in the check's 8 minutes"}
            continue
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
            res_file = Path(args.out, f"{name}.json")
            res = json.loads(res_file.read_text()) if res_file.exists() else \
                {"status": "failed", "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
        except subprocess.TimeoutExpired:
            res = {"status": "failed", "error": f"over its time limit of {limit} s"}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = res
        shown = {k: v for k, v in res.items() if k not in ("trace",)}
        print(f"{name:15s} {json.dumps(shown)}", flush=True)
        report["wall_s"] = round(time.perf_counter() - t_all, 1)
        Path(args.out, "gpu_check.json").write_text(json.dumps(report, indent=1))  # after each: a cut run keeps its figures
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    Path(args.out, "gpu_check.json").write_text(json.dumps(report, indent=1))
    failed = [n for n, r in report["sections"].items() if r["status"] == "failed"]
    print(f"gpu_check: {len(report['sections'])} sections, failed: {failed or 'none'}; {args.out}/gpu_check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
