"""All model parallelism lives here: process groups, the Megatron-core GPTModel built for a Hugging Face
Qwen2/Llama config with tensor and pipeline parallelism, and what megatron-core needs to run on CPU.

megatron-core 0.16 runs on CPU over gloo with three shims (`enable_cpu_megatron`), found by running it:
  1. `torch.cuda.current_device()` is asked for the device of new tensors (rotary embedding, p2p shapes):
     on a machine without CUDA it returns the CPU device.
  2. Its RNG tracker forks CUDA generator states around dropout/initialisation: a CPU tracker forks the
     CPU generator instead (same API, seeded per TP rank as Megatron seeds it).
  3. The pipeline schedules and p2p module create tensors with device="cuda" and call
     torch.cuda.synchronize(): in those two modules `torch` is replaced by a proxy that places such
     tensors on the CPU, and synchronize is a no-op.
Everything else (vocab-parallel cross entropy, TP/PP communication) is megatron-core's own code over gloo.
Transformer Engine and apex are optional and not used on CPU.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

_CPU_SHIMS = False


class _CpuTorch(types.ModuleType):
    """`torch` for megatron's pipeline modules on CPU: tensors asked for on "cuda" are made on the CPU."""

    _FACTORIES = ("zeros", "empty", "ones", "tensor", "full")

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name not in self._FACTORIES:
            return value

        def make(*args: Any, **kwargs: Any) -> Any:
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return value(*args, **kwargs)

        return make


def enable_cpu_megatron() -> None:
    """Install the CPU shims (idempotent; does nothing where CUDA is available)."""
    global _CPU_SHIMS
    if _CPU_SHIMS or torch.cuda.is_available():
        return
    import megatron.core.pipeline_parallel.p2p_communication as p2p
    import megatron.core.pipeline_parallel.schedules as schedules

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    proxy = _CpuTorch("torch")
    schedules.torch = proxy
    p2p.torch = proxy
    _CPU_SHIMS = True


def _cpu_rng_tracker() -> Any:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker()


def seed_model_parallel(seed: int) -> None:
    """Megatron's model_parallel_cuda_manual_seed, on CPU or CUDA."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tracker = _cpu_rng_tracker()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # the offsets Megatron uses: model-parallel regions differ per TP rank, data-parallel ones agree
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * parallel_state.get_expert_model_parallel_rank())
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)


def init_model_parallel(tp: int, pp: int, seed: int = 0) -> None:
    """Process groups for TP x PP (x DP, the rest of the world), on an initialised torch.distributed."""
    from megatron.core import parallel_state

    enable_cpu_megatron()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_model_parallel(seed)


def transformer_config(hf_config: Any, *, tp: int, pp: int, dtype: torch.dtype = torch.float32) -> Any:
    """Megatron's TransformerConfig for a Qwen2/Llama HF config: GQA, SwiGLU, RMSNorm, RoPE, QKV bias for Qwen2."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_prorl.policy.megatron_convert import ModelShape

    s = ModelShape.from_hf_config(hf_config)
    return TransformerConfig(
        num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_heads,
        num_query_groups=s.num_kv_heads, ffn_hidden_size=s.ffn_hidden_size, kv_channels=s.head_dim,
        add_bias_linear=False, add_qkv_bias=s.qkv_bias, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps,
        attention_dropout=0.0, hidden_dropout=0.0, params_dtype=dtype, pipeline_dtype=dtype,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=not torch.cuda.is_available(),
        # fused kernels are CUDA-only; megatron falls back to these unfused paths
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
    )


def rope_theta(hf_config: Any) -> float:
    """transformers 5 keeps it in `rope_parameters`, 4.x in `rope_theta`."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0)


def build_gpt(hf_config: Any, *, tp: int, pp: int, vocab_multiple: int = 128, dtype: torch.dtype = torch.float32) -> Any:
    """This rank's stage of a GPTModel with the local layer spec (Transformer Engine's is issue 5's next step)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_prorl.policy.megatron_convert import ModelShape, padded_vocab

    s = ModelShape.from_hf_config(hf_config)
    cfg = transformer_config(hf_config, tp=tp, pp=pp, dtype=dtype)
    return GPTModel(
        cfg, get_gpt_layer_local_spec(qk_layernorm=False, normalization="RMSNorm"),
        vocab_size=padded_vocab(s.vocab_size, tp, vocab_multiple), max_sequence_length=hf_config.max_position_embeddings,
        share_embeddings_and_output_weights=s.tied_embeddings, position_embedding_type="rope",
        rotary_base=int(rope_theta(hf_config)),
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
    )


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                            temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities of `labels` from this TP rank's vocabulary shard of the logits, without
    gathering the full vocabulary (megatron's vocab-parallel cross entropy: one all-reduce of the max, one
    of the sum). Rows added to pad the vocabulary to a multiple of TP are masked out, or their zero logits
    would take probability mass. Works in place on `logits` (a float32 copy if they are not float32)."""
    from megatron.core import parallel_state, tensor_parallel

    x = logits.float() if logits.dtype != torch.float32 else logits
    if temperature != 1.0:
        x.div_(temperature)
    shard = x.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard > vocab_size:
        x[..., max(vocab_size - start, 0):] = float("-inf")
    return -tensor_parallel.vocab_parallel_cross_entropy(x, labels)
