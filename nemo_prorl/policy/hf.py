"""Embedded policy backend: Hugging Face transformers (Qwen2, Llama, ...) with torch AdamW.
Runs on CPU or a single GPU; the Megatron-core backend serves multi-GPU runs behind the same interface."""

from __future__ import annotations

import contextlib
import copy
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from nemo_prorl.algo.loss import entropy_from_logits
from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.policy.base import POLICY_BACKENDS, Batch, LossFn, PolicyBackend
from nemo_prorl.policy.routing import MoERouting
from nemo_prorl.torch_utils import DTYPES


def trimmed_forward(
    model: torch.nn.Module, mb: Batch, *, temperature: float, with_entropy: str = "none",
    routing: Optional[MoERouting] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Logprobs (and entropy) [b, R] of the response tokens of one micro-batch. `with_entropy`: "none",
    "metric" (no gradient) or "grad" (for the entropy bonus).

    Columns that are padding in every row (leading prompt padding, trailing response padding) are cut
    before the forward pass, so a short micro-batch does not pay for the longest sequence of the step.
    Position ids come from the attention mask, exactly as the rollout engine computes them.
    A micro-batch with `routed_experts` (routing replay) runs with those experts forced through `routing`,
    the hooks on `model`'s routers.
    """
    ids, am, rmask = mb["input_ids"], mb["attention_mask"], mb["response_mask"]
    R = rmask.shape[1]
    P = ids.shape[1] - R
    lead = int((am[:, :P].cumsum(dim=1) == 0).sum(dim=1).min())
    r_used = max(int(rmask.sum(dim=1).max()), 1)
    ids_t, am_t = ids[:, lead : P + r_used], am[:, lead : P + r_used]
    pos = (am_t.cumsum(dim=-1) - 1).clamp(min=0)
    replay = contextlib.nullcontext()
    if "routed_experts" in mb:
        if routing is None or not routing.num_layers:
            raise ValueError("rollout.routing_replay: the batch carries routed experts but the policy has no "
                             "MoE router (or was built with rollout.routing_replay=false)")
        replay = routing.forcing(mb["routed_experts"][:, lead : P + r_used])
    with replay:
        logits = model(input_ids=ids_t, attention_mask=am_t, position_ids=pos, use_cache=False).logits
    # Row t predicts token t+1: the response tokens are predicted by the columns just before them.
    start = P - lead - 1
    logits = logits[:, start : start + r_used].float() / temperature
    targets = ids[:, P : P + r_used]
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    logp = F.pad(logp, (0, R - r_used)) * rmask[:, :R].to(logp.dtype)
    ent = None
    if with_entropy != "none":
        # With a zero bonus the entropy is a metric only: no graph (it would keep [b, R, V] probabilities).
        with torch.set_grad_enabled(with_entropy == "grad" and torch.is_grad_enabled()):
            ent = F.pad(entropy_from_logits(logits), (0, R - r_used)) * rmask.to(logp.dtype)
    return logp, ent


def by_length(batch: Batch, size: int) -> list[tuple[torch.Tensor, Batch]]:
    """Micro-batches of `size` rows with rows of similar length together (longest prompts first, then
    longest responses), with each one's row indices. `trimmed_forward` cuts a micro-batch to its longest
    row, so grouping by length removes most padding: on the embedded default's steps it falls from 18% to
    5% of the tokens processed, and far more with ProRL's response lengths (hundreds to 8k tokens)."""
    am, rm = batch["attention_mask"], batch["response_mask"]
    R = rm.shape[1]
    key = am[:, : am.shape[1] - R].sum(dim=1) * (R + 1) + rm.sum(dim=1).long()
    order = torch.argsort(key, descending=True, stable=True)
    return [(rows, {k: v[rows] for k, v in batch.items()}) for rows in order.split(size)]


class HFPolicy(PolicyBackend):
    def __init__(self, cfg: ProRLConfig, model_dir: Path, *, use_reference: bool) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.cluster.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[cfg.model.dtype]).to(self.device)
        self.model.config.use_cache = False
        self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False) if use_reference else None
        # Router hooks (rollout.routing_replay): they force the experts of batches that carry `routed_experts`.
        # The reference model replays them too, so the KL term compares the two policies on the same experts.
        self.routing = {id(m): MoERouting(m) for m in (self.model, self.ref_model)
                        if m is not None and cfg.rollout.routing_replay}
        self.optimizer, self.scheduler = self._make_optimizer()

    def _make_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        o = self.cfg.policy.optim
        opt = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        warmup = o.warmup_steps
        # ProRL §3.2: constant learning rate (after an optional linear warmup).
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return opt, sched

    def _to_device(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def logprobs(self, batch: Batch, *, temperature: float, reference: bool = False) -> torch.Tensor:
        model = self.ref_model if reference else self.model
        if model is None:
            raise RuntimeError("this policy was built without a reference model (algo.kl_coef is 0)")
        model.eval()
        out = torch.zeros_like(batch["response_mask"], dtype=torch.float32)
        for rows, mb in by_length(batch, self.cfg.policy.logprob_micro_batch_size):
            out[rows] = trimmed_forward(model, self._to_device(mb), temperature=temperature, with_entropy="none",
                                        routing=self.routing.get(id(model)))[0].float().cpu()
        return out

    def train_minibatch(self, batch: Batch, loss_fn: LossFn, *, temperature: float) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        # the loss's normalisers are mini-batch totals, so the grouping into micro-batches is free
        for _, mb in by_length(batch, self.cfg.policy.micro_batch_size):
            mb = self._to_device(mb)
            logp, ent = trimmed_forward(self.model, mb, temperature=temperature,
                                        with_entropy="grad" if self.cfg.algo.entropy_coef > 0 else "metric",
                                        routing=self.routing.get(id(self.model)))
            loss, metrics = loss_fn(logp, ent, mb)
            loss.backward()
            for k, v in metrics.items():
                sums[k] += float(v)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.policy.optim.grad_clip))
        out = dict(sums, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0])
        if math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
            out["update_skipped"] = 0.0
        else:  # a NaN/inf gradient would poison the weights: drop this update, keep going, and say so
            self.optimizer.zero_grad(set_to_none=True)
            out["update_skipped"] = 1.0
        return out

    def reset_reference(self) -> None:
        if self.ref_model is not None:
            self.ref_model.load_state_dict(self.model.state_dict())

    def reset_optimizer(self) -> None:
        self.optimizer, self.scheduler = self._make_optimizer()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        # the checkpoint's names: a MoE model's fused experts come out per expert (views, no copies), as the
        # weight sync, vLLM and the Megatron mapping name them (policy/hf_experts.py)
        from nemo_prorl.policy.hf_experts import canonical_items

        for name, tensor in canonical_items(self.model.state_dict().items()):
            yield name, tensor.detach()

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path, safe_serialization=True)

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.ref_model is not None:
            state["reference"] = self.ref_model.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ref_model is not None and "reference" in state:
            self.ref_model.load_state_dict(state["reference"])


@POLICY_BACKENDS.register("hf")
def build_hf_policy(cfg: ProRLConfig, model_dir: Path) -> PolicyBackend:
    # The reference model is only kept when the KL term needs it.
    return HFPolicy(cfg, model_dir, use_reference=cfg.algo.kl_coef > 0)
