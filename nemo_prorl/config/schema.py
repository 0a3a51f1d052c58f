"""Typed configuration: the one place where defaults live. Hydra composes `conf/` over these dataclasses,
so a misspelt key fails at launch with the key named. Batch sizes name their units."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TinyModelConfig:
    """A small Qwen2 (the architecture of ProRL's base model) built locally when no model path is given."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    vocab_size: int = 320  # target size of the BPE tokenizer trained on the task corpus
    # qwen2 (ProRL's base model) | qwen3 (QK-norm, explicit head_dim) | qwen3_moe (Qwen3-30B-A3B's layout)
    architecture: str = "qwen2"
    head_dim: Optional[int] = None  # qwen3*: None = hidden_size / num_attention_heads (vLLM-CPU needs >= 32)
    num_experts: int = 8  # qwen3_moe
    num_experts_per_tok: int = 2  # qwen3_moe: top-k
    moe_intermediate_size: int = 64  # qwen3_moe: each expert's FFN size


@dataclass
class WarmStartConfig:
    """Short supervised warm start of the tiny model, so RL starts from a model that sometimes succeeds.
    The result is cached under `cache_dir`, keyed by everything that determines it."""

    enabled: bool = True
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    num_examples: int = 4096
    # Fraction of warm-start answers that are right; the rest are off by a small amount. A noisy teacher
    # leaves the right answer in the model's distribution without making it reliable, the situation RL
    # with a verifier improves (1.0 gives plain supervised learning).
    teacher_accuracy: float = 1.0
    cache_dir: str = "~/.cache/nemo_prorl/warmstart"


@dataclass
class ModelConfig:
    path: Optional[str] = None  # a Hugging Face folder; None builds the tiny model (embedded default)
    dtype: str = "float32"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class OptimConfig:
    # ProRL §3.2: AdamW, constant learning rate 2e-6.
    lr: float = 2e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class MegatronConfig:
    """policy.backend=megatron: megatron-core GPTModel with TP x PP x DP (policy/parallel.py). The world
    size is tensor * pipeline * data parallel; one Ray actor per rank, placed by the cluster plan."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    virtual_pipeline_parallel_size: Optional[int] = None  # interleaved 1F1B: model chunks per pipeline rank
    # None: as many replicas as the training devices hold (cluster.num_nodes - rollout_nodes nodes x devices
    # per node, divided by TP x PP); resolved at launch.
    data_parallel_size: Optional[int] = 1
    sequence_parallel: bool = False  # shard layernorm/dropout activations along the sequence (needs TP > 1)
    use_distributed_optimizer: bool = True  # ZeRO-1: optimizer state sharded over data-parallel ranks
    # Micro-batches are filled with whole sequences up to this many (padded) tokens, longest first, and
    # each is cut to its own longest sequence: short rollouts do not pay for the longest one of the step.
    micro_batch_tokens: int = 16384
    logprob_micro_batch_tokens: int = 32768
    recompute_granularity: Optional[str] = None  # null | selective (attention core) | full (whole layers)
    recompute_method: str = "uniform"  # full recompute: uniform | block
    recompute_num_layers: int = 1
    transformer_impl: str = "auto"  # auto (Transformer Engine when importable) | local | transformer_engine
    fp8: Optional[str] = None  # null | hybrid | e4m3 (needs Transformer Engine)
    fp8_recipe: str = "delayed"  # delayed | tensorwise (current scaling) | mxfp8 | blockwise
    dist_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    make_vocab_size_divisible_by: int = 128
    # Mixture-of-experts (Qwen3-MoE). Experts are split over expert_parallel_size ranks, each expert's
    # FFN over expert_tensor_parallel_size ranks (None: = tensor_parallel_size, as Megatron-Bridge does).
    # With expert_parallel_size=1 expert-TP must equal TP (below it the experts' gradients go unsummed over
    # TP; above it megatron adds different expert-TP shards' gradients over DP): the plan refuses any other
    # value. The EP group is carved from TP x DP (megatron's order tp-cp-ep-pp-dp).
    expert_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    moe_token_dispatcher_type: str = "alltoall"  # alltoall | allgather
    moe_grouped_gemm: Optional[bool] = None  # None: with Transformer Engine (GPU); the local spec runs experts one by one
    moe_router_load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    moe_aux_loss_coeff: float = 1e-3  # Qwen3-MoE's router_aux_loss_coef
    moe_z_loss_coeff: Optional[float] = None
    worker_timeout_s: float = 3600.0  # a command no worker answers in this time is an error, not a hang


@dataclass
class PolicyConfig:
    backend: str = "hf"  # registry: nemo_prorl.policy.POLICY_BACKENDS
    micro_batch_size: int = 8  # sequences per forward/backward pass (hf backend)
    logprob_micro_batch_size: int = 16  # sequences per no-grad logprob pass (hf backend)
    optim: OptimConfig = field(default_factory=OptimConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)


@dataclass
class VLLMConfig:
    """rollout.engine=vllm: vLLM in its own process (nemo_prorl/rollout/vllm_server.py)."""

    # Interpreter of the engine process. None: $PRORL_VLLM_PYTHON, else this one. A separate virtualenv
    # is how the CPU build (vllm-cpu, which pins its own transformers) runs beside the trainer here.
    python: Optional[str] = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5  # colocated with the policy on the same GPUs
    enforce_eager: bool = False  # True: no CUDA graphs / torch.compile (faster start, slower decode)
    enable_prefix_caching: bool = True  # the n samples of a prompt share its KV cache
    max_model_len: Optional[int] = None  # None: data.max_prompt_length + rollout.max_response_length
    kv_cache_gb: Optional[float] = None  # CPU only: KV cache size (vLLM's default takes most of the RAM)
    # Colocated: free weights and KV cache during the policy update, wake for the sync and generation.
    # vLLM's CPU build has no sleep mode, so there this only applies on GPU.
    sleep_during_update: bool = True
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 7200.0  # one generate() call of a whole step
    # GPU: vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1), so that a prompt's completions do not
    # depend on the batch it is decoded in, hence not on rollout.num_engines; false trades that for speed.
    # The CPU build has no such kernels (README "Several rollout engines").
    batch_invariant: bool = True


@dataclass
class RolloutConfig:
    engine: str = "torch"  # registry: nemo_prorl.rollout.ROLLOUT_ENGINES
    temperature: float = 1.2  # ProRL §3.2: high temperature keeps exploration up over long runs
    top_p: float = 1.0
    max_response_length: int = 8192  # tokens; ProRL runs 1-7 used 8k, run 8 16k
    stop: list[str] = field(default_factory=list)  # stop strings, besides the tokenizer's EOS token
    max_num_seqs: int = 256  # sequences decoded together; bounds KV-cache memory
    weight_sync_bucket_mb: float = 256.0
    # Data-parallel generation engines (each over rollout.vllm.tensor_parallel_size devices), Ray actors
    # placed by the cluster plan. null: with policy=megatron, vllm fills the training devices (ProRL 1.5B on
    # 4 x 8 GPUs: 32), except on one CPU machine without cluster.cpu_slots_per_node; with
    # cluster.rollout_devices_per_node, either engine fills those devices; otherwise 1 (the torch engine then
    # runs in the controller's process, or as an actor with algo.async.max_staleness > 0). torch with more
    # than 1: actors too (a CPU-only cluster spreads its rollouts).
    num_engines: Optional[int] = None
    # Compare the engine's sampling logprobs with the policy's on the same tokens every n steps (0: never).
    # With several updates per step it is free: it uses the old-logprob pass, which covers the rows of the
    # updates after the first; with one update it costs a forward pass.
    mismatch_check_every_n_steps: int = 1
    # Rollout routing replay (R3, arXiv 2510.11370), mixture-of-experts policies only: the engines return the
    # experts every MoE layer chose for each token (Completion.routed_experts), and the trainer's logprob and
    # training forwards use those experts instead of routing again, so both compute the same function of the
    # same tokens. The router's weights still train: its gate values for the replayed experts carry gradient.
    routing_replay: bool = False
    # Torch engine: a prompt's KV cache is held once for all its samples instead of copied into each sample's
    # row (rollout/shared_prefix.py), so memory stops growing with n x prompt length (BroRL's n = 512). The
    # same tokens and logprobs either way, bit for bit; false: the copying cache, for benchmarks/broad_rollouts.py.
    share_prompt_cache: bool = True
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class DynamicSamplingConfig:
    # DAPO §3.2; ProRL §2 keeps it on for the whole run.
    enabled: bool = True
    max_generation_rounds: int = 3
    reward_atol: float = 0.0
    # Prompts drawn per generation round: ceil(algo.num_prompts_per_step x batch_multiplier), so that after the
    # uniform groups are filtered out one round usually fills the step (NeMo-RL's grpo.batch_multiplier;
    # its ProRL v2 config uses 1.5). Groups with signal beyond the step's need are dropped, as in DAPO.
    batch_multiplier: float = 1.0


@dataclass
class ReferenceResetConfig:
    # ProRL §2.3.1: hard-reset pi_ref to the current policy when validation stagnates, and reinitialise the
    # optimizer (ProRL v2 keeps the optimizer state instead).
    every_n_steps: Optional[int] = None
    stall_patience: Optional[int] = None  # evaluations without validation gain before a reset
    stall_min_delta: float = 0.0
    reset_optimizer: bool = False


@dataclass
class RolloutCorrectionConfig:
    """Importance-sampling correction for the rollout engine's numerical mismatch with the policy
    (token level; w = pi_policy_old / pi_rollout on each sampled token)."""

    # none | tis: truncated IS, w clipped at tis_cap (Yao et al. 2025, "Your efficient RL framework
    # secretly brings you off-policy RL training") | icepop: tokens with w outside [low, high] are masked
    # out of the policy gradient (IcePop, Ling team 2025)
    mode: str = "none"
    tis_cap: float = 2.0
    icepop_low: float = 0.5
    icepop_high: float = 2.0
    # Sequence-level geometric-mean mask, applied on top of `mode`: a response whose per-token ratios
    # w = pi_proximal / pi_behaviour have a geometric mean exp(mean_t log w_t) outside [geo_mask_low,
    # geo_mask_high] is left out of the policy gradient as a whole (NeMo-RL's ProRL v2.1 guide, "seq-mask-tis").
    # The band is narrow: a mean log-ratio of 1e-3 per token already marks a response sampled far off-policy.
    seq_geo_mask: bool = False
    geo_mask_low: float = 0.999
    geo_mask_high: float = 1.002


@dataclass
class AsyncConfig:
    """Asynchronous GRPO (README "Asynchronous steps"): a rollout producer keeps the engines generating
    while the trainer updates, and the trainer never trains on a sample whose oldest token came from a
    policy more than `max_staleness` versions behind the one it updates (version v = the weights after v
    updates; a step that keeps no group is no version). 0: the synchronous trainer, bit for bit (ProRL
    trained that way)."""

    max_staleness: int = 0
    # Groups generated ahead of the trainer (in flight, being scored, or waiting in the buffer); a bound on
    # memory and on staleness. null: max_staleness x algo.num_prompts_per_step, which keeps every sample
    # within the bound when each step takes num_prompts_per_step groups.
    max_buffered_groups: Optional[int] = None
    # Prompts the producer hands to the engines per request: smaller requests score and reach the buffer
    # sooner (DAPO filters them as they arrive); null: algo.num_prompts_per_step.
    prompts_per_request: Optional[int] = None


class AlgoConfig:
    advantage_estimator: str = "grpo"  # registry: nemo_prorl.algo.advantages.ADVANTAGE_ESTIMATORS
    num_prompts_per_step: int = 256  # ProRL §3.2: batch size 256 prompts
    num_generations_per_prompt: int = 16  # ProRL §3.2: n = 16 rollouts per prompt
    num_prompts_per_minibatch: int = 64  # ProRL §3.2: mini-batch 64, i.e. 4 updates per step
    num_epochs_per_step: int = 1
    clip_eps_low: float = 0.2  # ProRL §2 decoupled clipping (DAPO clip-higher)
    clip_eps_high: float = 0.4
    clip_ratio_c: Optional[float] = None  # dual-clip bound for negative advantages (e.g. 3.0)
    loss_agg_mode: str = "token-mean"
    # ProRL (eq. 4) keeps a KL penalty but does not state beta; 1e-4 is a conservative default that the
    # reference resets make cheap to keep.
    kl_coef: float = 1e-4
    kl_estimator: str = "k3"
    # Entropy bonus: loss - entropy_coef * entropy (aggregated like the loss), with its gradient in both
    # backends. ProRL relies on clip-higher and resets instead (0); at 0 the entropy is only a metric.
    entropy_coef: float = 0.0
    advantage_eps: float = 1e-6  # added to GRPO's group std; REINFORCE++-baseline whitens with verl's 1e-8
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    reference_reset: ReferenceResetConfig = field(default_factory=ReferenceResetConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    # algo.async: declared below the class (`async` is a Python keyword); read it with `async_config(cfg)`.



def _with_keyword_field(cls: type, name: str, kind: type) -> type:
    """Make `cls` a dataclass with one more field, `name`, that is a Python keyword (`algo.async` on the
    command line, as users of verl and NeMo-RL know it). Such a field cannot appear in generated code, so
    __init__ is written here (OmegaConf builds the object with keyword arguments from a dict), and repr and
    eq are object's."""
    cls.__annotations__[name] = kind
    setattr(cls, name, field(default_factory=kind))

    def __init__(self: Any, **values: Any) -> None:
        for f in dataclasses.fields(cls):
            if f.name in values:
                setattr(self, f.name, values.pop(f.name))
            else:
                setattr(self, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING
                        else f.default)
        if values:
            raise TypeError(f"{cls.__name__}: unexpected fields {sorted(values)}")

    cls.__init__ = __init__
    return dataclass(init=False, repr=False, eq=False)(cls)


AlgoConfig = _with_keyword_field(AlgoConfig, "async", AsyncConfig)


def async_config(cfg: Any) -> AsyncConfig:
    """`cfg.algo.async` of a ProRLConfig (or of its AlgoConfig)."""
    return getattr(getattr(cfg, "algo", cfg), "async")

@dataclass
class SyntheticTaskConfig:
    """Procedurally generated tasks with exact answers (the embedded demo's data)."""

    tasks: list[str] = field(default_factory=lambda: ["reverse", "sort"])  # reverse | sort | arithmetic
    min_digits: int = 3  # digit strings for reverse and sort
    max_digits: int = 8
    min_operands: int = 2  # arithmetic expressions
    max_operands: int = 3
    max_value: int = 99
    operators: str = "+-"


@dataclass
class SourceConfig:
    """One data source of a blend: a local file with a row format, or rows generated by reasoning-gym."""

    path: str = ""  # .jsonl / .json (one object per line) / .parquet; empty for format=reasoning_gym
    format: str = "auto"  # registry nemo_prorl.data.formats.FORMATS; "auto" detects from the first row
    domain: Optional[str] = None  # math, code, stem, logic, instruction_following; None: from the rows
    reward: Optional[str] = None  # None: the domain's verifier
    weight: Optional[float] = None  # relative share of draws; None: proportional to rows per epoch
    max_samples: Optional[int] = None  # rows per epoch (validation: prompts drawn); None: all rows
    enabled: bool = True  # a disabled source keeps its place in the checkpoint for when it returns
    # format=reasoning_gym: tasks (["all"]: every task the package ships), entries per task, seed
    tasks: list[str] = field(default_factory=list)
    size_per_task: int = 1000
    seed: Optional[int] = None  # None: data.seed (validation sources: data.seed + 1)


@dataclass
class PromptFormatConfig:
    """Instructions appended to the problem per domain (ProRL §3.1 prompt formats). Rows already in chat
    form (format=verl, format=records) are used as they are."""

    math: str = "Let's think step by step and output the final answer within \\boxed{}."
    stem: str = "Let's think step by step and output the final answer within \\boxed{}."
    code: str = ("Write Python code to solve the problem. Present the code in \n```python\nYour code\n```\n"
                 "at the end.")
    logic: str = "Give your final answer inside <answer></answer> tags."
    instruction_following: str = ""
    # None: the tokenizer's own chat template; "r1_distill": DeepSeek-R1-Distill's, opening a <think> block
    chat_template: Optional[str] = None


@dataclass
class DataConfig:
    source: str = "synthetic"  # registry: nemo_prorl.data.DATA_SOURCES ("synthetic", "blend")
    seed: int = 1234
    max_prompt_length: int = 1024  # tokens; longer prompts are dropped and counted
    num_validation_prompts: int = 256
    synthetic: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)
    # source=blend: training sources by name, and held-out validation sources (max_samples each)
    blend: dict[str, SourceConfig] = field(default_factory=dict)
    validation: dict[str, SourceConfig] = field(default_factory=dict)
    prompt: PromptFormatConfig = field(default_factory=PromptFormatConfig)
    on_bad_row: str = "error"  # "error": stop naming file and row; "skip": skip, count, log


@dataclass
class OverlongShapingConfig:
    enabled: bool = False  # DAPO §3.4 soft overlong punishment
    buffer_length: int = 1024
    penalty_factor: float = 1.0


@dataclass
class StopProperlyConfig:
    enabled: bool = False  # ProRL Appendix E, runs 4-5
    truncated_reward_scale: float = 0.0


@dataclass
class LengthPenaltyConfig:
    """ProRL v2's scheduled cosine length penalty (algo/shaping.py): penalty(L) = min_value + (max_value -
    min_value) * (1 + cos(pi L / L_max)) / 2 for a response of L tokens (L_max = rollout.max_response_length),
    at the steps the schedule switches it on. It applies to the groups DAPO's filter kept, after it: the
    filter sees the rewards without it (trainer/scoring.py, length_penalty_step)."""

    enabled: bool = False
    # The blog's "reward/penalty boundaries" (its numbers are not published): max_value at length 0,
    # min_value at L_max. 0 / -0.5: a correct answer never gains from the shaping and the longest keeps half
    # its reward (Yeo et al. 2025's cosine reward for correct answers also halves, 2 -> 1, over the length).
    max_value: float = 0.0
    min_value: float = -0.5
    # correct: every response with a positive reward that stopped properly gets reward x (1 + penalty(L))
    # (for a reward of 1 the same as adding it; partial credit is scaled alike; 0 stays 0, so wrong answers
    # are not taught to be short, and truncation is reward.stop_properly's business); all: reward + penalty(L)
    # for every response. The blog does not say which responses get it.
    apply_to: str = "correct"
    start_step: int = 1  # off before this trainer step (steps count from 1)
    # From start_step: on for `on_steps` steps, then off for `off_steps`, over and over; null: always on
    on_steps: Optional[int] = None
    off_steps: int = 0


@dataclass
class MathRewardConfig:
    # Math-Verify and the sympy fallback run in worker processes; one that exceeds the limit is killed
    # and replaced, so a pathological expression cannot hang scoring.
    timeout_s: float = 5.0
    num_workers: int = 2


@dataclass
class ReasoningGymRewardConfig:
    # Scorers run in confined worker processes (some eval the answer); one past the limit is killed.
    timeout_s: float = 10.0
    num_workers: int = 2


@dataclass
class IFEvalRewardConfig:
    # Training-time gate (rewards/ifeval.py, `attempted`): an answer with fewer than `min_distinct_words`
    # distinct words (of two or more letters; one character each in scripts written without spaces; fewer
    # where the row's own instructions cap the length) scores 0, with the gate in its reason. Upstream IFEval
    # scores '.' or 'ok' 1.0 on a row whose instructions are all prohibitions (no commas, no capitals, ...),
    # and a policy trained on that learns to say nothing. `prorl eval` turns the gate off (upstream semantics).
    require_attempt: bool = True
    min_distinct_words: int = 5


@dataclass
class SandboxConfig:
    """Limits for running generated code (confine/sandbox.py). ProRL §3.1 (code): reward = fraction of
    tests passed, 0 on syntax error or more than 5 s in total."""

    backend: str = "local"  # "local" (rlimits + process group) or "remote" (HTTP, see confine/remote.py)
    url: str = ""  # for backend=remote, e.g. http://sandbox-host:8080
    total_timeout_s: float = 5.0  # wall time for all of a program's test cases together
    per_test_timeout_s: float = 5.0
    cpu_time_s: int = 5  # RLIMIT_CPU per process
    memory_mb: int = 1024  # RLIMIT_AS
    max_processes: int = 32  # RLIMIT_NPROC counts the sandbox user's processes; see confine/sandbox.py
    max_output_bytes: int = 1 << 20  # a test's stdout (or call result) kept; more fails the test
    # all of a program's tests together: more fails the rest (the trainer holds what comes back)
    max_run_output_bytes: int = 16 << 20
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE
    num_workers: int = 4  # programs run concurrently
    python: str = ""  # interpreter for programs; "" = the trainer's own
    # A machine that cannot confine programs (no user/mount/PID namespaces, e.g. Docker's default seccomp
    # profile) refuses to run them unless this is set; then a warning is logged once per run.
    allow_unconfined: bool = False
    disk_mb: int = 64  # the program's only writable folder is a tmpfs of this size, gone after the run
    # backend=remote: the file holding the server's shared secret (else env PRORL_SANDBOX_TOKEN)
    token_file: str = ""


@dataclass
class RewardConfig:
    num_workers: int = 4  # threads scoring rows of rewards without their own pool
    math: MathRewardConfig = field(default_factory=MathRewardConfig)
    reasoning_gym: ReasoningGymRewardConfig = field(default_factory=ReasoningGymRewardConfig)
    ifeval: IFEvalRewardConfig = field(default_factory=IFEvalRewardConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    # STEM numeric answers: accepted within this relative tolerance (answers are often rounded).
    stem_rel_tol: float = 0.01
    overlong: OverlongShapingConfig = field(default_factory=OverlongShapingConfig)
    stop_properly: StopProperlyConfig = field(default_factory=StopProperlyConfig)
    length_penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)
    # Seconds a node's reward worker (cluster.rewards_on_every_node) may take for its share of a batch before
    # it is taken for hung: replaced, its rows scored again, then recorded as errors. null: derived from the
    # verifiers' own limits above and the rows of the share (cluster/rewards.py, derived_worker_timeout).
    worker_timeout_s: Optional[float] = None
    # Seconds a busy node reward worker may take to answer a liveness check (sent every few seconds while it
    # scores, answered by a thread of its own): a stopped or frozen process (SIGSTOP, a verifier stuck in C
    # code holding the GIL) is replaced after this, without waiting out worker_timeout_s.
    worker_liveness_timeout_s: float = 60.0


@dataclass
class ValidationConfig:
    every_n_steps: int = 10
    num_samples_per_prompt: int = 8
    # ProRL §3.2 evaluates with temperature 0.6 and top-p 0.95.
    temperature: float = 0.6
    top_p: float = 0.95
    max_response_length: Optional[int] = None  # None: rollout.max_response_length
    pass_k: list[int] = field(default_factory=lambda: [1, 8])
    metric: str = "pass@1"  # feeds the reference-reset stall rule


@dataclass
class EvalConfig:
    """`prorl eval CHECKPOINT ...`: pass@k of checkpoints on held-out benchmark files (nemo_prorl/eval/)."""

    # Benchmarks by name, each a local file with a row format (or generated by reasoning-gym), as the
    # sources of data.blend; `max_samples` caps the prompts. Empty: the data source's validation set.
    tasks: dict[str, SourceConfig] = field(default_factory=dict)
    # ProRL §3.2: pass@1 is averaged over 16 samples per prompt; its pass@k curves use up to 256.
    num_samples_per_prompt: int = 16
    temperature: float = 0.6  # ProRL §3.2 evaluation sampling
    top_p: float = 0.95
    max_response_length: Optional[int] = None  # None: rollout.max_response_length
    pass_k: list[int] = field(default_factory=lambda: [1, 16])  # reported in the table; the curve adds 2^i
    seed: int = 0
    output_dir: str = "runs/eval/${experiment_name}"
    save_samples: bool = False  # also write every response with its reward: <output_dir>/samples/<checkpoint>.jsonl


@dataclass
class ClusterConfig:
    """Where a run's processes go (nemo_prorl/cluster/: the placement plan, `prorl plan`, Ray). The embedded
    default (hf policy, torch engine) is one process and starts no Ray."""

    device: str = "cpu"  # cpu | cuda
    num_nodes: int = 1
    gpus_per_node: int = 0  # cuda: GPUs of each node, one Megatron rank each
    # cpu: Megatron ranks / engine devices per node ("CPU slots"); None on one node: as many as the run needs
    cpu_slots_per_node: Optional[int] = None
    # Split mode: the last `rollout_nodes` nodes only generate (their weights arrive through a relay actor on
    # each, see weight_sync/sender.py WeightRelay), the others only train; needs policy=megatron. 0: colocated (engines
    # share the training devices and sleep during the update).
    rollout_nodes: int = 0
    # Split inside a node: the last `rollout_devices_per_node` GPUs (CPU slots) of every training node only
    # generate, the others train (weights reach them through the node's shared memory / CUDA IPC, as when
    # colocated). With algo.async.max_staleness > 0 the engines need devices of their own: this, or
    # rollout_nodes. 0: engines share the training devices (colocated) unless rollout_nodes says otherwise.
    rollout_devices_per_node: int = 0
    # Attach to the Ray cluster a launcher started (host:port of its head); None: start a private one on this
    # machine (loopback only) when the run needs Ray (policy=megatron or rollout=vllm).
    ray_address: Optional[str] = None
    # The cluster's token file (Ray token authentication, RAY_AUTH_TOKEN_PATH); None with ray_address:
    # $RAY_AUTH_TOKEN_PATH. A private cluster gets a fresh token (mode 0600) in its own temp folder.
    ray_token_file: Optional[str] = None
    ray_object_store_gb: float = 4.0  # a private cluster's object store (shared memory), per node
    ray_dashboard: bool = False  # a private cluster's dashboard (on loopback); off: one service less
    ray_timeout_s: float = 120.0  # starting or attaching to Ray, and placing the actors, within this time
    num_threads: Optional[int] = None  # torch intra-op threads on CPU; None leaves torch's default
    # Score rewards with a worker actor on every node (its own verifier pools and code sandbox), a step's
    # rows split between them; None: on a cluster of several nodes. false: all in the controller's process.
    rewards_on_every_node: Optional[bool] = None


@dataclass
class HackingAlarmConfig:
    """The reward-hacking alarm (trainer/validate.py, algo/hacking.py): per domain, a warning (log, events,
    `alarm/reward_hacking/<domain>` = 1, the progress bar) when the training reward (`reward/<domain>`, the
    mean of the steps since the previous validation) rose and validation's `val/<validation.metric>/<domain>`
    fell, each by more than `min_delta`, at `patience` validations in a row."""

    patience: int = 3  # validations in a row; 0 disables the alarm
    min_delta: float = 0.01  # smaller changes, either way, are noise and end the streak


@dataclass
class TrainerConfig:
    num_steps: int = 2000
    seed: int = 42
    output_dir: str = "runs/${experiment_name}"
    checkpoint_every_n_steps: int = 50
    keep_last_checkpoints: int = 3
    # Also keep the checkpoint with the best value of this validation metric (e.g. "val/pass@1"); None: off.
    keep_best_metric: Optional[str] = None
    # A step whose update was skipped (NaN/inf in the loss or gradients) is logged and the run goes on;
    # this many in a row stop it with a checkpoint, since the run is no longer learning.
    max_consecutive_skipped_updates: int = 3
    progress_bar: bool = True
    tensorboard: bool = True
    plot: bool = True
    hacking_alarm: HackingAlarmConfig = field(default_factory=HackingAlarmConfig)


WANDB_MODES = ("auto", "online", "offline", "disabled")  # logger.wandb.mode


@dataclass
class WandbConfig:
    """Weights & Biases (nemo_prorl/trainer/trackers.py); `pip install nemo_prorl[wandb]`."""

    enabled: bool = False
    project: str = "nemo_prorl"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: experiment_name
    tags: list[str] = field(default_factory=list)
    # auto: online when WANDB_API_KEY is set or `wandb login` stored a key, else offline (`wandb sync` later);
    # online, offline, disabled: wandb's own modes
    mode: str = "auto"
    dir: Optional[str] = None  # None: <trainer.output_dir> (wandb writes its wandb/ folder there)


@dataclass
class MlflowConfig:
    """MLflow (nemo_prorl/trainer/trackers.py); `pip install nemo_prorl[mlflow]`."""

    enabled: bool = False
    tracking_uri: Optional[str] = None  # None: sqlite:///<trainer.output_dir>/mlruns/mlflow.db; or http(s)://host:port
    experiment_name: Optional[str] = None  # None: experiment_name
    run_name: Optional[str] = None  # None: experiment_name


@dataclass
class LoggerConfig:
    """Experiment trackers beside metrics.jsonl and TensorBoard (trainer.tensorboard), fed the same dict."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class ProRLConfig:
    experiment_name: str = "prorl"
    # Continue from a checkpoint: "auto" (the latest complete one under trainer.output_dir, else a fresh
    # start), a checkpoint folder, or None (fresh start).
    resume: Optional[str] = None
    # Set by a stage of a staged recipe (`stage=run3`, conf/stage/): resuming into another stage starts it
    # with a hard reset of the reference policy (and the optimizer, per algo.reference_reset).
    stage_name: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
