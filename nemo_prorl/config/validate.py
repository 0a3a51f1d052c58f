"""Value checks that types alone cannot express. All problems are reported at once, each with its key."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional

from nemo_prorl.config.errors import ConfigError
from nemo_prorl.config.schema import WANDB_MODES, ProRLConfig, async_config


def _registry_names() -> dict[str, Iterable[str]]:
    # Imported here: the registries pull in backends, which the schema module must not depend on.
    from nemo_prorl.algo.advantages import ADVANTAGE_ESTIMATORS
    from nemo_prorl.algo.loss import KL_ESTIMATORS, LOSS_AGG_MODES
    from nemo_prorl.data import DATA_SOURCES
    from nemo_prorl.policy import POLICY_BACKENDS
    from nemo_prorl.rollout import ROLLOUT_ENGINES
    from nemo_prorl.torch_utils import DTYPES

    return {
        "policy.backend": POLICY_BACKENDS.names(),
        "rollout.engine": ROLLOUT_ENGINES.names(),
        "algo.advantage_estimator": ADVANTAGE_ESTIMATORS.names(),
        "algo.loss_agg_mode": LOSS_AGG_MODES,
        "algo.kl_estimator": KL_ESTIMATORS,
        "data.source": DATA_SOURCES.names(),
        "cluster.device": ("cpu", "cuda"),
        "model.dtype": tuple(DTYPES),
    }


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def validate_config(cfg: ProRLConfig) -> None:
    from nemo_prorl.algo.advantages import NEEDS_GROUP

    errors: list[str] = []

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            errors.append(f"{key}={_get(cfg, key)!r}: {rule}")

    for key, allowed in _registry_names().items():
        allowed = list(allowed)
        check(_get(cfg, key) in allowed, key, f"allowed values: {', '.join(allowed)}")

    a = cfg.algo
    check(a.clip_eps_low >= 0, "algo.clip_eps_low", "must be >= 0")
    check(a.clip_eps_low < 1, "algo.clip_eps_low", "must be < 1 (the ratio is clipped at 1 - eps_low)")
    check(a.clip_eps_high >= 0, "algo.clip_eps_high", "must be >= 0")
    check(a.clip_ratio_c is None or a.clip_ratio_c > 1, "algo.clip_ratio_c", "dual-clip bound must be > 1 or null")
    check(a.kl_coef >= 0, "algo.kl_coef", "must be >= 0")
    check(a.entropy_coef >= 0, "algo.entropy_coef", "must be >= 0")
    check(a.num_prompts_per_step >= 1, "algo.num_prompts_per_step", "must be >= 1")
    check(a.num_epochs_per_step >= 1, "algo.num_epochs_per_step", "must be >= 1")
    check(
        1 <= a.num_prompts_per_minibatch <= a.num_prompts_per_step,
        "algo.num_prompts_per_minibatch",
        f"must be between 1 and algo.num_prompts_per_step={a.num_prompts_per_step}",
    )
    # Every planned update gets the same number of groups; a remainder would get a whole optimizer step.
    check(
        a.num_prompts_per_minibatch < 1 or a.num_prompts_per_step % a.num_prompts_per_minibatch == 0,
        "algo.num_prompts_per_minibatch",
        f"must divide algo.num_prompts_per_step={a.num_prompts_per_step}, so that every update of a step gets "
        f"as many groups",
    )
    min_n = 2 if a.advantage_estimator in NEEDS_GROUP else 1
    check(
        a.num_generations_per_prompt >= min_n,
        "algo.num_generations_per_prompt",
        f"must be >= {min_n} with algo.advantage_estimator={a.advantage_estimator!r} "
        "(group-relative advantages need several responses per prompt)",
    )
    check(a.dynamic_sampling.max_generation_rounds >= 1, "algo.dynamic_sampling.max_generation_rounds", "must be >= 1")
    check(a.dynamic_sampling.batch_multiplier >= 1, "algo.dynamic_sampling.batch_multiplier",
          "must be >= 1 (prompts drawn per round: num_prompts_per_step x batch_multiplier)")
    ac = async_config(a)
    check(ac.max_staleness >= 0, "algo.async.max_staleness", "must be >= 0 (0: synchronous steps)")
    check(ac.max_buffered_groups is None or ac.max_buffered_groups >= 1, "algo.async.max_buffered_groups",
          "must be >= 1 or null (max_staleness x num_prompts_per_step)")
    check(ac.prompts_per_request is None or ac.prompts_per_request >= 1, "algo.async.prompts_per_request",
          "must be >= 1 or null (num_prompts_per_step)")
    r = a.reference_reset
    check(r.every_n_steps is None or r.every_n_steps >= 1, "algo.reference_reset.every_n_steps", "must be >= 1 or null")
    check(r.stall_patience is None or r.stall_patience >= 1, "algo.reference_reset.stall_patience", "must be >= 1 or null")

    ro = cfg.rollout
    check(ro.temperature > 0, "rollout.temperature", "must be > 0")
    check(0 < ro.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    check(ro.max_response_length >= 1, "rollout.max_response_length", "must be >= 1")
    check(ro.max_num_seqs >= 1, "rollout.max_num_seqs", "must be >= 1")
    check(ro.weight_sync_bucket_mb > 0, "rollout.weight_sync_bucket_mb", "must be > 0")
    check(ro.mismatch_check_every_n_steps >= 0, "rollout.mismatch_check_every_n_steps", "must be >= 0 (0: never)")
    check(all(isinstance(x, str) and x for x in ro.stop), "rollout.stop", "stop strings must be non-empty")
    experts = _model_experts(cfg)  # None: the model folder is not there yet
    if ro.routing_replay:
        _check_routing_replay(experts, check)
    if ro.engine == "vllm":
        _check_vllm(cfg, check)
    _check_cluster(cfg, check)
    from nemo_prorl.algo.offpolicy import ROLLOUT_CORRECTIONS

    rc = a.rollout_correction
    check(rc.mode in ROLLOUT_CORRECTIONS, "algo.rollout_correction.mode", f"allowed values: {', '.join(ROLLOUT_CORRECTIONS)}")
    check(rc.tis_cap >= 1, "algo.rollout_correction.tis_cap", "must be >= 1")
    check(0 <= rc.icepop_low <= 1 <= rc.icepop_high, "algo.rollout_correction.icepop_low",
          f"need icepop_low <= 1 <= icepop_high (icepop_high={rc.icepop_high})")
    check(0 < rc.geo_mask_low <= 1 <= rc.geo_mask_high, "algo.rollout_correction.geo_mask_low",
          f"need 0 < geo_mask_low <= 1 <= geo_mask_high (geo_mask_high={rc.geo_mask_high})")

    p = cfg.policy
    check(p.micro_batch_size >= 1, "policy.micro_batch_size", "must be >= 1")
    check(p.logprob_micro_batch_size >= 1, "policy.logprob_micro_batch_size", "must be >= 1")
    check(p.optim.lr > 0, "policy.optim.lr", "must be > 0")
    check(p.optim.grad_clip > 0, "policy.optim.grad_clip", "must be > 0")

    if p.backend == "megatron":
        _check_megatron(cfg, check, experts)
    else:  # policy.megatron is not used: expert parallelism asked for there would silently not happen
        for key, default in (("expert_parallel_size", 1), ("expert_tensor_parallel_size", None)):
            check(getattr(p.megatron, key) == default, f"policy.megatron.{key}",
                  f"expert parallelism is the megatron backend's (policy.backend={p.backend!r}): use policy=megatron "
                  f"or leave it at {default}")

    v = cfg.validation
    check(v.every_n_steps >= 0, "validation.every_n_steps", "must be >= 0 (0 disables validation)")
    check(v.num_samples_per_prompt >= 1, "validation.num_samples_per_prompt", "must be >= 1")
    check(
        all(1 <= k <= v.num_samples_per_prompt for k in v.pass_k),
        "validation.pass_k",
        f"every k must be between 1 and validation.num_samples_per_prompt={v.num_samples_per_prompt}",
    )
    allowed_metrics = [f"pass@{k}" for k in v.pass_k] + ["reward"]
    check(v.metric in allowed_metrics, "validation.metric", f"allowed values: {', '.join(allowed_metrics)}")

    e = cfg.eval
    check(e.num_samples_per_prompt >= 1, "eval.num_samples_per_prompt", "must be >= 1")
    check(bool(e.pass_k) and all(1 <= k <= e.num_samples_per_prompt for k in e.pass_k), "eval.pass_k",
          f"every k must be between 1 and eval.num_samples_per_prompt={e.num_samples_per_prompt} (pass@k needs "
          "at least k samples per prompt; raise eval.num_samples_per_prompt)")
    check(e.temperature > 0, "eval.temperature", "must be > 0")
    check(0 < e.top_p <= 1, "eval.top_p", "must be in (0, 1]")
    check(e.max_response_length is None or e.max_response_length >= 1, "eval.max_response_length", "must be >= 1")

    rw = cfg.reward
    from nemo_prorl.confine import SANDBOXES

    check(rw.num_workers >= 1, "reward.num_workers", "must be >= 1")
    check(rw.math.timeout_s > 0, "reward.math.timeout_s", "must be > 0")
    check(rw.math.num_workers >= 1, "reward.math.num_workers", "must be >= 1")
    check(rw.reasoning_gym.timeout_s > 0, "reward.reasoning_gym.timeout_s", "must be > 0")
    check(rw.reasoning_gym.num_workers >= 1, "reward.reasoning_gym.num_workers", "must be >= 1")
    check(rw.stem_rel_tol >= 0, "reward.stem_rel_tol", "must be >= 0")
    check(rw.worker_timeout_s is None or rw.worker_timeout_s > 0, "reward.worker_timeout_s",
          "must be > 0, or null (derived from the verifiers' time limits)")
    check(rw.worker_liveness_timeout_s > 0, "reward.worker_liveness_timeout_s", "must be > 0")
    sb = rw.sandbox
    check(sb.backend in SANDBOXES, "reward.sandbox.backend", f"allowed values: {', '.join(SANDBOXES.names())}")
    check(sb.backend != "remote" or sb.url.startswith(("http://", "https://")), "reward.sandbox.url",
          "must be an http(s):// URL when reward.sandbox.backend=remote")
    for key in ("total_timeout_s", "per_test_timeout_s", "cpu_time_s", "memory_mb", "max_processes",
                "max_output_bytes", "max_run_output_bytes", "max_file_bytes", "num_workers"):
        check(getattr(sb, key) > 0, f"reward.sandbox.{key}", "must be > 0")

    lp = cfg.reward.length_penalty
    check(lp.apply_to in ("correct", "all"), "reward.length_penalty.apply_to", "allowed values: correct, all")
    check(lp.min_value <= lp.max_value, "reward.length_penalty.min_value",
          f"must be <= reward.length_penalty.max_value={lp.max_value} (the penalty at L_max vs at length 0)")
    if lp.enabled and lp.apply_to == "correct":
        # reward x (1 + penalty) keeps a positive reward positive while 1 + min_value > 0; the overlong
        # punishment comes before it (shaped_rewards), and leaves a reward-1 answer that stopped (L <= L_max)
        # at least 1 - penalty_factor, so it too must stay above 0
        check(lp.min_value > -1, "reward.length_penalty.min_value",
              "must be > -1 with apply_to=correct (a rewarded answer's reward x (1 + min_value) stays positive)")
        check(not cfg.reward.overlong.enabled or cfg.reward.overlong.penalty_factor < 1,
              "reward.overlong.penalty_factor", "must be < 1 with reward.length_penalty (apply_to=correct): a "
              "correct answer that stopped keeps 1 - penalty_factor > 0 before the length penalty scales it")
    if lp.enabled and lp.apply_to == "all":
        check(lp.max_value - lp.min_value < 1, "reward.length_penalty.min_value",
              "max_value - min_value must be < 1 with apply_to=all, so a reward-1 answer of any length still "
              "outscores a reward-0 one")
    check(lp.start_step >= 1, "reward.length_penalty.start_step", "must be >= 1 (trainer steps count from 1)")
    check(lp.on_steps is None or lp.on_steps >= 1, "reward.length_penalty.on_steps", "must be >= 1 or null (always on)")
    check(lp.off_steps >= 0, "reward.length_penalty.off_steps", "must be >= 0")
    s = cfg.reward.overlong
    check(not s.enabled or 0 < s.buffer_length <= ro.max_response_length, "reward.overlong.buffer_length",
          "must be in (0, rollout.max_response_length]")
    from nemo_prorl.data.synthetic import TASKS

    bad_tasks = [t for t in cfg.data.synthetic.tasks if t not in TASKS]
    check(not bad_tasks and bool(cfg.data.synthetic.tasks), "data.synthetic.tasks",
          f"allowed values: {', '.join(TASKS.names())}")
    check(cfg.data.num_validation_prompts >= 0, "data.num_validation_prompts", "must be >= 0")
    _check_sources(cfg.data, check, cfg.eval.tasks)
    check(cfg.trainer.num_steps >= 0, "trainer.num_steps", "must be >= 0")
    check(cfg.trainer.keep_last_checkpoints >= 1, "trainer.keep_last_checkpoints", "must be >= 1")
    check(cfg.trainer.hacking_alarm.patience >= 0, "trainer.hacking_alarm.patience",
          "must be >= 0 (0 disables the alarm)")
    check(cfg.trainer.hacking_alarm.min_delta >= 0, "trainer.hacking_alarm.min_delta", "must be >= 0")
    check(cfg.logger.wandb.mode in WANDB_MODES, "logger.wandb.mode", f"allowed values: {', '.join(WANDB_MODES)}")
    if cfg.model.path is None:
        check(cfg.model.warm_start.steps >= 0, "model.warm_start.steps", "must be >= 0")

    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def _check_sources(data, check, eval_tasks) -> None:
    from nemo_prorl.data.formats import DOMAIN_ALIASES, FORMATS
    from nemo_prorl.data.templates import CHAT_TEMPLATES
    from nemo_prorl.rewards import REWARDS

    check(data.on_bad_row in ("error", "skip"), "data.on_bad_row", "allowed values: error, skip")
    check(data.prompt.chat_template is None or data.prompt.chat_template in CHAT_TEMPLATES,
          "data.prompt.chat_template", f"allowed values: null, {', '.join(CHAT_TEMPLATES)}")
    check(data.source != "blend" or bool(data.blend), "data.blend", "data.source=blend needs at least one source")
    formats = ["auto", "reasoning_gym", *FORMATS.names()]
    groups = {"data.blend": data.blend, "data.validation": data.validation, "eval.tasks": eval_tasks}
    for group, sources in groups.items():
        for name, s in sources.items():
            key = f"{group}.{name}"
            check(s.format in formats, f"{key}.format", f"allowed values: {', '.join(sorted(set(formats)))}")
            check(s.format == "reasoning_gym" or bool(s.path), f"{key}.path", "is required (a .jsonl or .parquet file)")
            check(s.format != "reasoning_gym" or bool(s.tasks), f"{key}.tasks", "list reasoning-gym tasks, or [all]")
            check(s.domain is None or s.domain.lower() in DOMAIN_ALIASES, f"{key}.domain",
                  f"allowed values: {', '.join(sorted(DOMAIN_ALIASES))}")
            check(s.reward is None or s.reward in REWARDS, f"{key}.reward", f"allowed values: {', '.join(REWARDS.names())}")
            check(s.weight is None or s.weight >= 0, f"{key}.weight", "must be >= 0")
            check(s.max_samples is None or s.max_samples >= 1, f"{key}.max_samples", "must be >= 1")
            check(s.size_per_task >= 1, f"{key}.size_per_task", "must be >= 1")


def _check_megatron(cfg: ProRLConfig, check, experts: Optional[tuple[int, str]]) -> None:
    from nemo_prorl.policy.parallel import transformer_engine_available

    m, k = cfg.policy.megatron, "policy.megatron"
    for size in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "micro_batch_tokens",
                 "logprob_micro_batch_tokens", "make_vocab_size_divisible_by", "recompute_num_layers"):
        check(getattr(m, size) >= 1, f"{k}.{size}", "must be >= 1")
    vp = m.virtual_pipeline_parallel_size
    check(vp is None or (vp >= 2 and m.pipeline_parallel_size >= 2), f"{k}.virtual_pipeline_parallel_size",
          "must be null, or >= 2 with pipeline_parallel_size >= 2 (interleaved schedule)")
    rows = cfg.algo.num_prompts_per_minibatch * cfg.algo.num_generations_per_prompt
    check(m.data_parallel_size <= rows, f"{k}.data_parallel_size",
          f"must not exceed the {rows} rows of a mini-batch (algo.num_prompts_per_minibatch x num_generations)")
    check(m.recompute_granularity in (None, "selective", "full"), f"{k}.recompute_granularity",
          "allowed values: null, selective, full")
    check(m.recompute_method in ("uniform", "block"), f"{k}.recompute_method", "allowed values: uniform, block")
    check(m.transformer_impl in ("auto", "local", "transformer_engine"), f"{k}.transformer_impl",
          "allowed values: auto, local, transformer_engine")
    check(m.dist_backend in ("auto", "gloo", "nccl"), f"{k}.dist_backend", "allowed values: auto, gloo, nccl")
    check(m.fp8 in (None, "hybrid", "e4m3"), f"{k}.fp8", "allowed values: null, hybrid, e4m3")
    check(m.fp8_recipe in ("delayed", "tensorwise", "mxfp8", "blockwise"), f"{k}.fp8_recipe",
          "allowed values: delayed, tensorwise (current scaling), mxfp8, blockwise")
    te = transformer_engine_available()
    # FP8 GEMMs and sequence-parallel norms exist only in Transformer Engine (megatron's torch fallback
    # norm refuses sequence parallelism): say so at launch, not after the workers have started.
    check(m.fp8 is None or (te and m.transformer_impl != "local"), f"{k}.fp8",
          "needs Transformer Engine (pip install transformer_engine[pytorch] on a Hopper/Blackwell GPU) and "
          "policy.megatron.transformer_impl auto or transformer_engine; transformer_engine does not import here"
          if not te else "needs policy.megatron.transformer_impl auto or transformer_engine")
    check(not m.sequence_parallel or m.tensor_parallel_size > 1, f"{k}.sequence_parallel", "needs tensor_parallel_size > 1")
    # on CPU the local spec's torch norms run sequence-parallel (policy/parallel.py, shim 8)
    check(not m.sequence_parallel or (te and m.transformer_impl != "local") or cfg.cluster.device == "cpu",
          f"{k}.sequence_parallel",
          "needs Transformer Engine's layer spec on GPUs (megatron's torch norm does not support sequence parallelism)")
    check(m.transformer_impl != "transformer_engine" or te, f"{k}.transformer_impl",
          "transformer_engine does not import here; use auto or local")
    check(cfg.cluster.device == "cuda" or m.dist_backend != "nccl", f"{k}.dist_backend", "nccl needs cluster.device=cuda")
    _check_moe(m, k, check, experts)


def _check_moe(m: Any, k: str, check, experts: Optional[tuple[int, str]]) -> None:
    """Mixture-of-experts keys (the layout itself is checked by the placement plan, cluster/plan.py), and,
    where the model's shape is known (`experts`: _model_experts), the keys against it."""
    check(m.expert_parallel_size >= 1, f"{k}.expert_parallel_size", "must be >= 1")
    check(m.expert_tensor_parallel_size is None or m.expert_tensor_parallel_size >= 1,
          f"{k}.expert_tensor_parallel_size", "must be >= 1, or null (= tensor_parallel_size)")
    check(m.moe_token_dispatcher_type in ("alltoall", "allgather"), f"{k}.moe_token_dispatcher_type",
          "allowed values: alltoall, allgather")
    # allgather gathers equal-shaped token blocks from the EP group; our micro-batches differ in shape
    # from one DP rank to the next, so an EP group that spans DP ranks (EP x expert-TP > TP) needs alltoall
    etp = m.expert_tensor_parallel_size or m.tensor_parallel_size
    check(m.moe_token_dispatcher_type != "allgather" or m.expert_parallel_size * etp <= m.tensor_parallel_size,
          f"{k}.moe_token_dispatcher_type", "allgather needs expert_parallel_size x expert-TP <= tensor_parallel_size "
          "(micro-batches differ in shape across data-parallel ranks): use alltoall")
    check(m.moe_router_load_balancing_type in ("aux_loss", "seq_aux_loss", "none"),
          f"{k}.moe_router_load_balancing_type", "allowed values: aux_loss, seq_aux_loss, none")
    check(m.moe_aux_loss_coeff >= 0, f"{k}.moe_aux_loss_coeff", "must be >= 0")
    check(m.moe_z_loss_coeff is None or m.moe_z_loss_coeff >= 0, f"{k}.moe_z_loss_coeff", "must be >= 0 or null")
    # pipeline stages exchange shapes first because micro-batches differ in length (variable_seq_lengths, as
    # policy/parallel.py sets it: not with the interleaved schedule), which megatron's allgather refuses
    check(m.moe_token_dispatcher_type != "allgather" or m.pipeline_parallel_size == 1
          or bool(m.virtual_pipeline_parallel_size), f"{k}.moe_token_dispatcher_type",
          "allgather does not take micro-batches of varying length, which pipeline_parallel_size > 1 sends: "
          "use alltoall")
    if experts is None:
        return
    num, what = experts
    if num == 0:  # megatron would build the dense model and ignore the split the run asked for
        check(m.expert_parallel_size == 1, f"{k}.expert_parallel_size", f"{what} is a dense model (no experts to split)")
        check(m.expert_tensor_parallel_size is None, f"{k}.expert_tensor_parallel_size",
              f"{what} is a dense model (no experts to split): leave it null")
        return
    # megatron's MoE layer refuses TP > 1 without sequence parallelism only when it trains, after a rollout
    check(m.tensor_parallel_size == 1 or m.sequence_parallel, f"{k}.sequence_parallel",
          f"{what} is a mixture-of-experts model: with tensor_parallel_size={m.tensor_parallel_size} it needs "
          "sequence_parallel=true (megatron's MoE layer does not train without it)")
    if m.moe_aux_loss_coeff > 0 and m.moe_router_load_balancing_type == "none":
        # a warning, not an error: the coefficient has a non-zero default, and "none" alone says what is meant
        logging.getLogger("nemo_prorl").warning(
            "%s.moe_aux_loss_coeff=%s is ignored: %s.moe_router_load_balancing_type=none adds no load-balancing loss",
            k, m.moe_aux_loss_coeff, k)


def _check_cluster(cfg: ProRLConfig, check) -> None:
    c = cfg.cluster
    check(c.cpu_slots_per_node is None or c.cpu_slots_per_node >= 1, "cluster.cpu_slots_per_node", "must be >= 1 or null")
    check(c.device != "cuda" or c.gpus_per_node >= 1, "cluster.gpus_per_node", "must be >= 1 with cluster.device=cuda")
    check(c.ray_object_store_gb > 0, "cluster.ray_object_store_gb", "must be > 0")
    check(c.ray_timeout_s > 0, "cluster.ray_timeout_s", "must be > 0")
    check(cfg.rollout.num_engines is None or cfg.rollout.num_engines >= 1, "rollout.num_engines",
          "must be >= 1, or null (as many as the placement plan fits)")


def _check_vllm(cfg: ProRLConfig, check) -> None:
    v = cfg.rollout.vllm
    check(cfg.rollout.temperature <= 2, "rollout.temperature", "vLLM samples at temperatures up to 2")
    check(v.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size", "must be >= 1")
    check(0 < v.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization", "must be in (0, 1]")
    check(v.kv_cache_gb is None or v.kv_cache_gb > 0, "rollout.vllm.kv_cache_gb", "must be > 0 or null")
    need = cfg.data.max_prompt_length + cfg.rollout.max_response_length
    check(v.max_model_len is None or v.max_model_len >= need, "rollout.vllm.max_model_len",
          f"must be >= data.max_prompt_length + rollout.max_response_length = {need}, or null")
    check(v.startup_timeout_s > 0 and v.request_timeout_s > 0, "rollout.vllm.startup_timeout_s",
          "timeouts must be > 0")


def _model_experts(cfg: ProRLConfig) -> Optional[tuple[int, str]]:
    """(number of experts, what says so) of the policy's model, 0 experts for a dense one: the tiny model's
    architecture, or a model folder's config.json. None when the folder is not there yet (left to the run's
    own checks, which read the model)."""
    if cfg.model.path is None:
        t = cfg.model.tiny
        return (t.num_experts if t.architecture == "qwen3_moe" else 0), f"model.tiny.architecture={t.architecture!r}"
    conf = Path(cfg.model.path).expanduser() / "config.json"
    try:
        c = json.loads(conf.read_text())
    except (OSError, ValueError):
        return None
    n = int(c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts") or 0)
    return n, f"{conf} (model_type {c.get('model_type')!r})"


def _check_routing_replay(experts: Optional[tuple[int, str]], check) -> None:
    """rollout.routing_replay replays the experts of a mixture-of-experts policy: a dense one has none."""
    if experts is not None:
        check(experts[0] > 0, "rollout.routing_replay",
              f"needs a mixture-of-experts policy; {experts[1]} is a dense model (qwen3_moe is not)")
