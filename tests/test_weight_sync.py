"""The resharding stream from Megatron shards to HF-named full tensors, and the vLLM engine client's
failure paths that need no vLLM."""

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from nemo_prorl.policy.megatron_convert import ModelShape, hf_to_megatron, megatron_to_hf_lazy
from nemo_prorl.rollout.vllm_engine import VLLMEngineError, VLLMRolloutEngine
from nemo_prorl.weight_sync.buffer import iter_buckets, module_of, pack, packed_size


def tiny(arch: str):
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(Qwen2Config(**common)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _storages(shards):
    return {t.untyped_storage().data_ptr() for stage in shards for sd in stage for t in sd.values()}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)])
def test_stream_from_shards_is_the_hf_state_dict(arch, tp, pp):
    model = tiny(arch)
    sd = model.state_dict()
    s = ModelShape.from_hf_config(model.config)
    shards = [[hf_to_megatron(sd, s, tp_rank=t, tp=tp, pp_rank=p, pp=pp) for t in range(tp)] for p in range(pp)]
    stream = list(megatron_to_hf_lazy(shards, s))
    # exactly the names of the HF checkpoint, which is what vLLM's Qwen2 / Llama load_weights take
    assert sorted(w.name for w in stream) == sorted(sd)
    assert len(stream) == len(sd)
    # nothing is gathered up front: every piece is a view of a shard
    shard_storages = _storages(shards)
    assert all(p.untyped_storage().data_ptr() in shard_storages for w in stream for p in w.parts)
    for w in stream:
        assert w.shape == tuple(sd[w.name].shape) and w.dtype == sd[w.name].dtype
        assert torch.equal(w.materialize(), sd[w.name]), w.name
        out = torch.empty(w.shape, dtype=torch.bfloat16)
        assert torch.equal(w.materialize(out), sd[w.name].bfloat16()), w.name
    # each attention / MLP block comes in one run, so buckets can keep it whole
    modules = [module_of(w.name) for w in stream]
    runs = [m for i, m in enumerate(modules) if i == 0 or m != modules[i - 1]]
    blocks = [r for r in runs if r.endswith(("self_attn", "mlp"))]
    assert len(blocks) == 2 * s.num_layers and len(set(blocks)) == len(blocks)


@pytest.mark.parametrize("bucket_kb", [4, 64, 10_000])
def test_packed_buckets_carry_the_state_dict(bucket_kb):
    model = tiny("qwen2")
    sd = model.state_dict()
    s = ModelShape.from_hf_config(model.config)
    shards = [[hf_to_megatron(sd, s, tp_rank=t, tp=2) for t in range(2)]]
    buf = torch.empty(0, dtype=torch.uint8)
    got = {}
    for bucket in iter_buckets(megatron_to_hf_lazy(shards, s), bucket_kb * 1024, torch.bfloat16):
        need = packed_size(bucket, torch.bfloat16)
        if len(bucket) > 1 or need <= bucket_kb * 1024:
            assert need <= bucket_kb * 1024 or len({module_of(w.name) for w in bucket}) == 1
        if buf.numel() < need:
            buf = torch.empty(need, dtype=torch.uint8)
        for name, t in pack(bucket, buf, torch.bfloat16):
            assert t.dtype == torch.bfloat16 and t.is_contiguous()
            got[name] = t.clone()  # the next bucket reuses the buffer
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(got[k], v.bfloat16()), k


def test_engine_interpreter_that_cannot_serve_is_named(tmp_path):
    from nemo_prorl.config import load_config

    cfg, _ = load_config(["rollout=vllm", f"trainer.output_dir={tmp_path}", "rollout.vllm.startup_timeout_s=120"])
    spec = dict(model_dir=str(tmp_path), dtype="float32")
    with pytest.raises(VLLMEngineError, match="no-python.* cannot be started"):
        VLLMRolloutEngine(cfg, spec, python=str(tmp_path / "no-python"), log_path=tmp_path / "log")
    with pytest.raises(VLLMEngineError, match=r"'/bin/false' must run Python and Ray as the trainer does"):
        VLLMRolloutEngine(cfg, spec, python="/bin/false", log_path=tmp_path / "log")
    # an interpreter without vLLM: the engine actor reports the import error, and names the interpreter
    with pytest.raises(VLLMEngineError, match=r"failed during init(.|\n)*No module named 'vllm'(.|\n)*interpreter"):
        VLLMRolloutEngine(cfg, spec, python=sys.executable, log_path=tmp_path / "log")
