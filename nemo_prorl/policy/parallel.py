"""All model parallelism lives here: process groups, the Megatron-core GPTModel built for a Hugging Face
Qwen2/Llama config with tensor and pipeline parallelism, and what megatron-core needs to run on CPU.

megatron-core 0.16 runs on CPU over gloo with these shims (`enable_cpu_megatron`, `cuda_type_names`),
found by running it:
  1. `torch.cuda.current_device()` is asked for the device of new tensors (rotary embedding, p2p shapes,
     DDP buffers): on a machine without CUDA it returns the CPU device.
  2. Its RNG tracker forks CUDA generator states around dropout/initialisation/recomputation: a CPU
     tracker forks the CPU generator instead (same API, seeded per TP rank as Megatron seeds it).
  3. The pipeline schedules, p2p, DDP buffer and optimizer modules create tensors with device="cuda" and
     call torch.cuda.synchronize(): in those modules `torch` is replaced by a proxy that places such
     tensors on the CPU, and synchronize is a no-op.
  4. The optimizers dispatch on `param.type() == "torch.cuda.FloatTensor"`: around their construction and
     step, CPU tensors report CUDA type names.
  5. With tied embeddings and PP > 1 the last stage holds a copy of the first stage's embedding as its
     output layer, and the model's constructor moves that copy to the GPU (`.cuda()`) before the
     embedding group's all-reduce that makes both copies equal: during that setup `.cuda()` of a CPU
     tensor is the tensor itself. The all-reduce itself runs (over gloo), and so does the one of the two
     copies' gradients after every backward (finalize_model_grads), which keeps them equal.
  6. Mixture-of-experts (6 and 7: `shim_moe` in policy/megatron_moe.py): the router's gating GEMM calls
     Transformer Engine's te_general_gemm where it is bound, and the module binds it only when TE imports
     (a NameError without TE): it is bound to None, megatron's own torch.mm fallback. The per-layer
     aux-loss tracker is made on device="cuda".
  7. The alltoall token dispatcher copies its split sizes to the host on a side CUDA stream and waits for
     an event: on CPU they are host tensors already, taken as they are (numpy, as the dispatcher wants).
  8. Sequence parallelism: megatron's torch norm refuses it (TE's and apex's norms mark their weights
     `sequence_parallel`, so that finalize_model_grads sums their gradients over TP). A norm is per
     position, so it is built as usual and its weights are marked the same way. Mixture-of-experts
     models need sequence parallelism with TP > 1 (megatron's MoE layer refuses to train without it).
Everything else (DDP with reduce-scatter, the distributed optimizer, vocab-parallel cross entropy, TP/PP
communication, recomputation, sequence parallelism with shim 8, MoE routing and token dispatch) is
megatron-core's own code over gloo. What does not run on CPU: FP8 and grouped-GEMM experts (Transformer
Engine on GPUs). Transformer Engine and apex are optional.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Optional

import torch

from nemo_prorl.policy.megatron_moe import moe_fields, shim_moe

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


# megatron-core modules that create tensors with device="cuda" on the CPU path we use
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",  # the unfused multi-tensor l2 norm used for gradient clipping
)


def enable_cpu_megatron() -> None:
    """Install the CPU shims (idempotent; does nothing where CUDA is available)."""
    global _CPU_SHIMS
    if _CPU_SHIMS or torch.cuda.is_available():
        return
    import importlib

    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    proxy = _CpuTorch("torch")
    for name in _CUDA_FACTORY_MODULES:
        importlib.import_module(name).torch = proxy
    # activation recomputation saves and restores "the CUDA RNG" around each recomputed block: on CPU the
    # generator that dropout draws from is the CPU one (see the tracker below)
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _shim_tied_embedding_setup()
    shim_moe(proxy)  # shims 6-7, in policy/megatron_moe.py
    _shim_sequence_parallel_norm()
    _CPU_SHIMS = True


def _shim_sequence_parallel_norm() -> None:
    """Shim 8 (module doc): megatron's torch norm under sequence parallelism."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    make = WrappedTorchNorm.__new__
    if getattr(make, "_prorl_cpu", False):
        return

    def new(cls: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return make(cls, config, *args, **kwargs)
        config.sequence_parallel = False  # (only its own refusal reads it)
        try:
            norm = make(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for p in norm.parameters():  # each TP rank's gradient covers its own positions: summed over TP
            p.sequence_parallel = True
        return norm

    new._prorl_cpu = True  # type: ignore[attr-defined]
    WrappedTorchNorm.__new__ = staticmethod(new)  # type: ignore[method-assign,assignment]


@contextlib.contextmanager
def _cpu_tensors_stay() -> Any:
    """Within this block `tensor.cuda()` of a CPU tensor returns the tensor (a machine without CUDA)."""
    original = torch.Tensor.cuda

    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if self.device.type == "cpu" else original(self, *args, **kwargs)

    torch.Tensor.cuda = cuda  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def _shim_tied_embedding_setup() -> None:
    """Shim 5 (module doc): megatron's LanguageModule.setup_embeddings_and_output_layer, run with CPU
    tensors staying where they are, so its embedding-group all-reduce runs on the CPU copy."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer
    if getattr(setup, "_prorl_cpu", False):
        return

    def setup_on_cpu(self: Any) -> None:
        with _cpu_tensors_stay():
            setup(self)

    setup_on_cpu._prorl_cpu = True  # type: ignore[attr-defined]
    LanguageModule.setup_embeddings_and_output_layer = setup_on_cpu  # type: ignore[method-assign]


@contextlib.contextmanager
def cuda_type_names() -> Any:
    """Within this block CPU tensors answer `.type()` with CUDA type names. megatron's optimizers dispatch on
    `param.type() == "torch.cuda.FloatTensor"` (building main params, clipping gradients); around their
    construction and `step()` this lets them take the same path on CPU. Does nothing where CUDA is present."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


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


def init_model_parallel(tp: int, pp: int, seed: int = 0, vp: Optional[int] = None, *, ep: int = 1,
                        etp: Optional[int] = None) -> None:
    """Process groups for TP x PP (x DP, the rest of the world), on an initialised torch.distributed, and
    for the experts of a MoE model: EP ranks of expert-TP `etp` (None: = TP) each, carved out of TP x DP."""
    from megatron.core import parallel_state

    enable_cpu_megatron()
    if not parallel_state.model_parallel_is_initialized():
        # rank order TP, then PP, then DP (megatron's default puts DP before PP): the placement plan keeps
        # TP groups inside a node and pipeline stages next to each other (nemo_prorl/cluster/plan.py). The
        # experts' groups use the same order (expert-TP fastest, then EP): cluster/plan.py checks the sizes.
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 virtual_pipeline_model_parallel_size=vp, order="tp-cp-ep-pp-dp",
                                                 expert_model_parallel_size=ep,
                                                 expert_tensor_parallel_size=etp or tp)
    seed_model_parallel(seed)


def init_distributed(rank: int, world_size: int, *, rendezvous: Any, backend: str = "auto",
                     timeout_s: float = 1800.0) -> torch.device:
    """torch.distributed for one rank: NCCL and the GPU Ray gave this actor on CUDA machines, gloo on the
    CPU. Returns the rank's device.

    The group meets in `rendezvous`, the handle of its key-value actor (nemo_prorl/cluster/rendezvous.py), or
    a local `torch.distributed.Store` for ranks on one machine without Ray (benchmarks):
    gloo's peer addresses, NCCL's unique id and every sub-group's keys go through Ray, which admits only
    clients with the cluster's token. No TCPStore serves them: torch's has no authentication, and anyone
    who reached its port could list, read and overwrite the group's keys."""
    import datetime

    import torch.distributed as dist

    from nemo_prorl.cluster.rendezvous import RayStore

    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES per actor
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    # a local store (a benchmark's ranks on one machine, without Ray: HashStore, or FileStore in a private
    # folder) is used as it is; anything else is the handle of the group's rendezvous actor
    store = rendezvous if isinstance(rendezvous, dist.Store) else RayStore(rendezvous, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return device


def _sum_finalize(finalize: Any) -> Any:
    """Megatron's finalize_model_grads (DP reduction, tied/layernorm gradients) without its division by the
    token count: our loss is normalised before backward."""

    def fn(models: list[Any], num_tokens: Any = None, **kwargs: Any) -> None:
        finalize(models, None, **kwargs)

    return fn


def wrap_for_training(chunks: list[Any], *, use_distributed_optimizer: bool, lr: float, weight_decay: float,
                      betas: tuple[float, float], eps: float, grad_clip: float) -> tuple[list[Any], Any]:
    """Megatron's DistributedDataParallel around each model chunk (contiguous fp32 gradient buffers,
    reduce-scatter or all-reduce over DP) and its optimizer (Adam with decoupled weight decay; the
    distributed one shards its state over DP ranks, ZeRO-1).

    Gradients are *summed* over micro-batches and DP ranks (calculate_per_token_loss): the ProRL loss is
    already divided by the global token count of the mini-batch, so no further averaging is wanted."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer)
    wrapped = []
    for chunk in chunks:
        chunk.config.calculate_per_token_loss = True
        chunk.config.finalize_model_grads_func = _sum_finalize(finalize_model_grads)
        wrapped.append(DistributedDataParallel(chunk.config, ddp_cfg, chunk))
    if use_distributed_optimizer and any(getattr(c, "share_embeddings_and_output_weights", False) for c in chunks) \
            and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        _fix_unpadded_bucket_sizes(wrapped)  # only the layout it is for: everything else stays megatron's own
    cfg = chunks[0].config
    opt_cfg = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                              adam_beta2=betas[1], adam_eps=eps, clip_grad=grad_clip, bf16=cfg.bf16, fp16=cfg.fp16,
                              params_dtype=cfg.params_dtype, use_distributed_optimizer=use_distributed_optimizer)
    with cuda_type_names():
        optimizer = get_megatron_optimizer(opt_cfg, wrapped)
    return wrapped, optimizer


def _fix_unpadded_bucket_sizes(ddp_chunks: list[Any]) -> None:
    """Every gradient bucket's "unpadded" size ending at its last parameter, as megatron-core 0.16 records
    it for all buckets but one: with tied embeddings, PP > 1 and the distributed optimizer, the shared
    embedding gets a bucket of its own, and the bucket closed before it counts the alignment padding in
    front of the embedding as its own. Its distributed checkpoint ("dp_reshardable") then writes a
    padding piece past the end of the bucket's tensor, and saving fails ("out of bounds chunk"). Seen with
    the tiny test model (parameters of 32 values); where every parameter size is a multiple of 64 there is
    no such padding and this changes nothing. Runs before the optimizer, which copies these sizes."""
    for chunk in ddp_chunks:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            ends: dict[int, int] = {}
            for _, end, bucket_id in buffer.param_index_map.values():
                ends[bucket_id] = max(ends.get(bucket_id, 0), end)
            for i, bucket in enumerate(buffer.buckets):
                bucket.numel_unpadded = ends[i] - bucket.offset
            buffer.numel_unpadded = sum(b.numel_unpadded for b in buffer.buckets)


def _tp_all_reduce(t: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    """In-place all-reduce over the tensor-parallel group (a no-op without one: a single shard)."""
    import torch.distributed as dist

    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t


class _VocabParallelEntropy(torch.autograd.Function):
    """H = log Z - E_p[z] from this rank's vocabulary shard z (-inf marks masked entries).

    Forward: three all-reduces of [b, s] tensors (max, sum of exp, sum of exp * z) instead of gathering the
    vocabulary. Backward needs no communication: dH/dz_i = -p_i (log p_i + H), and p_i, log p_i and H are
    known on the shard that holds z_i once the forward's totals are. It keeps its own shifted copy of the
    logits, because megatron's vocab-parallel cross entropy runs next and works in place on them.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        m = logits.max(dim=-1).values
        _tp_all_reduce(m, group, dist.ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)
        e = shifted.exp()
        total = _tp_all_reduce(e.sum(dim=-1), group)
        weighted = _tp_all_reduce((e * torch.where(torch.isfinite(shifted), shifted, 0.0)).sum(dim=-1), group)
        log_total = total.log()
        entropy = log_total - weighted / total
        ctx.save_for_backward(shifted, log_total, entropy)
        return entropy

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        shifted, log_total, entropy = ctx.saved_tensors
        logp = shifted - log_total.unsqueeze(-1)
        g = -logp.exp() * (logp + entropy.unsqueeze(-1)) * grad.unsqueeze(-1)
        return torch.where(torch.isfinite(shifted), g, 0.0), None  # masked vocabulary entries: p = 0


def vocab_parallel_entropy(logits: torch.Tensor, group: Any = "tp") -> torch.Tensor:
    """Entropy [b, s] at each position from this TP rank's vocabulary shard [b, s, V/tp] of the logits
    (-inf marks masked entries). Differentiable, for the entropy bonus; under `torch.no_grad()` (the metric
    alone) it keeps nothing for a backward pass. `group`: the tensor-parallel group (default), or None for
    logits that hold the whole vocabulary."""
    if group == "tp":
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return _VocabParallelEntropy.apply(logits, group)


def transformer_config(hf_config: Any, *, tp: int, pp: int, dtype: torch.dtype = torch.float32,
                       **options: Any) -> Any:
    """Megatron's TransformerConfig for a Qwen2/Llama/Qwen3/Qwen3-MoE HF config: GQA, SwiGLU, RMSNorm, RoPE,
    QKV bias for Qwen2, QK-norm and an explicit head_dim for Qwen3, experts and router for Qwen3-MoE.
    `options` are further TransformerConfig fields (parallelism, recompute, FP8, MoE dispatcher and losses,
    routing replay); MoE-only ones are dropped for a dense model."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_prorl.policy.megatron_convert import ModelShape

    s = ModelShape.from_hf_config(hf_config)
    return TransformerConfig(
        num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_heads,
        num_query_groups=s.num_kv_heads, ffn_hidden_size=s.ffn_hidden_size, kv_channels=s.head_dim,
        add_bias_linear=False, add_qkv_bias=s.qkv_bias, gated_linear_unit=True, qk_layernorm=s.qk_norm,
        activation_func=torch.nn.functional.silu, normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps,
        attention_dropout=0.0, hidden_dropout=0.0, params_dtype=dtype, pipeline_dtype=dtype,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=not torch.cuda.is_available(),
        # fused kernels are CUDA-only; megatron falls back to these unfused paths
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, **moe_fields(s, tp, pp, options),
    )


def megatron_options(m: Any) -> dict[str, Any]:
    """TransformerConfig fields for `policy.megatron` (a MegatronConfig): parallelism, recompute, FP8, and the
    MoE ones (expert parallelism, dispatcher, load-balancing losses; transformer_config drops them for a
    dense model)."""
    opts: dict[str, Any] = dict(sequence_parallel=m.sequence_parallel,
                                virtual_pipeline_model_parallel_size=m.virtual_pipeline_parallel_size,
                                # micro-batches differ in length: pipeline stages exchange shapes first
                                # (not with the interleaved schedule, whose micro-batches share one shape)
                                variable_seq_lengths=m.pipeline_parallel_size > 1 and not m.virtual_pipeline_parallel_size,
                                # gloo matches a batch of isend/irecv to the same peer in posting order, and
                                # with PP=2 the previous and next stage are the same rank: the interleaved
                                # schedule then receives the wrong tensors. Separate ops are ordered safely.
                                batch_p2p_comm=torch.cuda.is_available())
    opts.update(expert_model_parallel_size=m.expert_parallel_size,
                expert_tensor_parallel_size=m.expert_tensor_parallel_size or m.tensor_parallel_size,
                moe_token_dispatcher_type=m.moe_token_dispatcher_type, moe_grouped_gemm=m.moe_grouped_gemm,
                moe_router_load_balancing_type=m.moe_router_load_balancing_type,
                moe_aux_loss_coeff=m.moe_aux_loss_coeff, moe_z_loss_coeff=m.moe_z_loss_coeff)
    if m.recompute_granularity:
        opts.update(recompute_granularity=m.recompute_granularity)
        if m.recompute_granularity == "full":
            opts.update(recompute_method=m.recompute_method, recompute_num_layers=m.recompute_num_layers)
    if m.fp8:
        opts.update(fp8=m.fp8, fp8_recipe=m.fp8_recipe)
    # Every MoE router gets megatron's RouterReplay (rollout.routing_replay): it only acts while
    # policy/megatron_replay.py sets an action, and a batch without routed_experts routes as usual, so it is
    # on whatever the rollout config says (this config only knows policy.megatron).
    opts.update(moe_enable_routing_replay=True)
    return opts


def rope_theta(hf_config: Any) -> float:
    """transformers 5 keeps it in `rope_parameters`, 4.x in `rope_theta`."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match this torch/CUDA
        return False
    return True


def use_transformer_engine(impl: str) -> bool:
    """`auto` takes Transformer Engine's layer spec when TE imports, the local spec otherwise."""
    if impl == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError("policy.megatron.transformer_impl=transformer_engine, but transformer_engine does not import")
    return impl == "transformer_engine" or (impl == "auto" and transformer_engine_available())


def build_gpt(hf_config: Any, *, tp: int, pp: int, vocab_multiple: int = 128, dtype: torch.dtype = torch.float32,
              te: bool = False, vp_stage: Optional[int] = None, **options: Any) -> Any:
    """This rank's pipeline stage (model chunk `vp_stage` of an interleaved pipeline) of a GPTModel, with Transformer Engine's layer spec
    (fused kernels, FP8; MoE experts as one grouped GEMM unless moe_grouped_gemm=False) or the local one
    (plain torch: runs on CPU; experts one by one)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from nemo_prorl.policy.megatron_convert import ModelShape, padded_vocab

    s = ModelShape.from_hf_config(hf_config)
    grouped = False
    if s.is_moe:
        grouped = te if options.get("moe_grouped_gemm") is None else bool(options["moe_grouped_gemm"])
        if grouped and not te:
            raise ValueError("policy.megatron.moe_grouped_gemm=true needs Transformer Engine's layer spec "
                             "(policy.megatron.transformer_impl); the local spec runs the experts one by one")
        options = {**options, "moe_grouped_gemm": grouped}
    cfg = transformer_config(hf_config, tp=tp, pp=pp, dtype=dtype, **options)
    experts = s.num_experts or None
    spec = (specs.get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=grouped,
                                                             qk_layernorm=s.qk_norm) if te
            else specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=s.qk_norm,
                                                normalization="RMSNorm"))
    return GPTModel(
        cfg, spec, vocab_size=padded_vocab(s.vocab_size, tp, vocab_multiple),
        max_sequence_length=hf_config.max_position_embeddings, share_embeddings_and_output_weights=s.tied_embeddings,
        position_embedding_type="rope", rotary_base=int(rope_theta(hf_config)),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage), vp_stage=vp_stage,
    )


def masked_vocab_logits_(logits: torch.Tensor, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """This TP rank's float32 vocabulary shard of the logits divided by the temperature, with the rows
    added to pad the vocabulary to a multiple of TP set to -inf (their zero logits would take
    probability mass). In place when the logits are float32 already."""
    from megatron.core import parallel_state

    x = logits.float() if logits.dtype != torch.float32 else logits
    if temperature != 1.0:
        x.div_(temperature)
    shard = x.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard > vocab_size:
        x[..., max(vocab_size - start, 0):] = float("-inf")
    return x


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                            temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities of `labels` from this TP rank's vocabulary shard of the logits, without
    gathering the full vocabulary (megatron's vocab-parallel cross entropy: one all-reduce of the max, one
    of the sum). Differentiable; works in place on float32 `logits`."""
    from megatron.core import tensor_parallel

    return -tensor_parallel.vocab_parallel_cross_entropy(masked_vocab_logits_(logits, vocab_size, temperature), labels)


def chunked_vocab_parallel_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                    *, temperature: float = 1.0, chunk_tokens: int = 1024) -> torch.Tensor:
    """No-grad log-probabilities [b, s] from the last hidden states [s, b, h] and this rank's output-layer
    shard [V/tp, h], computing the logits a few positions at a time: the peak is one chunk of float32
    logits over V/tp, not [s, b, V] (for ProRL's 16k-token rollouts and a 152k vocabulary, gigabytes)."""
    s, b = hidden.shape[:2]
    step = max(1, chunk_tokens // max(b, 1))
    out = torch.empty(s, b, dtype=torch.float32, device=hidden.device)
    lab = labels.t().contiguous()
    with torch.no_grad():
        for i in range(0, s, step):
            logits = torch.nn.functional.linear(hidden[i : i + step], weight)
            out[i : i + step] = vocab_parallel_logprobs(logits, lab[i : i + step].contiguous(), vocab_size, temperature)
    return out.t()
