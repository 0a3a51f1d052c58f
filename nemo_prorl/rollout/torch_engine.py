"""Embedded rollout engine: batched autoregressive sampling with a KV cache in plain PyTorch.

It holds its own copy of the model, like vLLM does, so the trainer must sync weights into it after every
update; that keeps the embedded path faithful to the distributed one."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.rollout.base import ROLLOUT_ENGINES, Completion, RolloutEngine, SamplingParams
from nemo_prorl.torch_utils import DTYPES


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside the smallest set whose probability mass reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward argument that takes the KV cache: `cache` since transformers renamed it (5.x, with
    `past_key_values` deprecated until its removal in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TorchRolloutEngine(RolloutEngine):
    def __init__(self, model_dir: Path, *, device: str, dtype: str, max_num_seqs: int, pad_token_id: int,
                 tokenizer: Optional[Any] = None) -> None:
        self.device = torch.device(device)
        self.weight_dtype = DTYPES[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(self.device).eval()
        self.model.requires_grad_(False)
        self.max_num_seqs = max_num_seqs
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer  # only needed for stop strings
        # keep_vars: the live tensors under every state-dict name (tied weights appear under both names).
        self._params = self.model.state_dict(keep_vars=True)
        self._cache_kw = cache_keyword(self.model)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        jobs = [(i, prompts[i]) for i in range(len(prompts)) for _ in range(params.n)]
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
        out: list[Completion] = []
        for start in range(0, len(jobs), self.max_num_seqs):
            out.extend(self._generate_chunk(jobs[start : start + self.max_num_seqs], params, gen))
        return out

    def _generate_chunk(
        self, jobs: list[tuple[int, Sequence[int]]], params: SamplingParams, gen: torch.Generator
    ) -> list[Completion]:
        B = len(jobs)
        # The n samples of a prompt share its prefill (vLLM's prefix caching does the same): each distinct
        # prompt runs once, and its KV cache and last logits are copied to its samples' rows. With n=8
        # this cuts the prompt tokens the model processes eightfold.
        first: dict[int, int] = {}
        for prompt_index, _ in jobs:
            first.setdefault(prompt_index, len(first))
        unique = list({i: p for i, p in jobs}.values())  # in order of first appearance, as `first`
        row_of = torch.tensor([first[i] for i, _ in jobs], device=self.device)
        P = max(len(p) for p in unique)
        ids = torch.full((len(unique), P), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(unique), P), dtype=torch.long)
        for row, p in enumerate(unique):  # left padding: every prompt ends at column P - 1
            ids[row, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, P - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(params.stop_token_ids or (-1,), device=self.device)
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            **{self._cache_kw: cache}).logits[:, -1]
        if len(unique) < B:
            cache.batch_select_indices(row_of)
            logits, mask, pos = logits[row_of], mask[row_of], pos[row_of]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        ends = torch.zeros(B, dtype=torch.long)  # response length of rows that stopped (0: still going)
        tokens, logps = [], []
        last_pos = pos[:, -1]
        for t in range(params.max_tokens):
            filtered = top_p_filter(logits.float() / params.temperature, params.top_p)
            logp_all = torch.log_softmax(filtered, dim=-1)
            probs = torch.softmax(filtered, dim=-1)
            if not bool(torch.isfinite(probs).all()):
                raise FloatingPointError("rollout engine: the model's logits are not finite (the synced policy "
                                         "weights have diverged); resume from an earlier checkpoint")
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(self.device)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_token_id), nxt)
            tokens.append(nxt)
            logps.append(logp_all.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
            live = ~done
            stopped = live & (torch.isin(nxt, stop) | self._stop_string_hit(tokens, live, params.stop))
            ends[stopped.cpu()] = t + 1
            done = done | stopped
            if bool(done.all()):
                break
            # Finished rows keep decoding padding that nothing attends to; it is cut out below.
            mask = torch.cat([mask, live.long().unsqueeze(-1)], dim=-1)
            last_pos = last_pos + live.long()
            logits = self.model(input_ids=nxt.unsqueeze(-1), attention_mask=mask, position_ids=last_pos.unsqueeze(-1),
                                use_cache=True, **{self._cache_kw: cache}).logits[:, -1]
        return self._collect(jobs, torch.stack(tokens, 1).cpu(), torch.stack(logps, 1).cpu(), ends)

    def _stop_string_hit(self, tokens: list[torch.Tensor], live: torch.Tensor, stop: tuple[str, ...]) -> torch.Tensor:
        """Rows whose newest token completes a stop string. Only a window of recent tokens is decoded: a
        string that fit entirely in the previous window would have stopped the row a step earlier."""
        hit = torch.zeros_like(live)
        if not stop:
            return hit
        if self.tokenizer is None:
            raise ValueError("stop strings need the engine to be built with a tokenizer")
        window = torch.stack(tokens[-(max(len(s) for s in stop) + 2):], 1).cpu()
        for row in torch.nonzero(live.cpu()).flatten().tolist():
            text = self.tokenizer.decode(window[row].tolist())
            hit[row] = any(s in text for s in stop)
        return hit

    @staticmethod
    def _collect(jobs, tokens: torch.Tensor, logps: torch.Tensor, ends: torch.Tensor) -> list[Completion]:
        out = []
        for row, (prompt_index, _) in enumerate(jobs):
            end = int(ends[row]) or tokens.shape[1]
            out.append(Completion(
                prompt_index=prompt_index,
                token_ids=tokens[row, :end].tolist(),
                logprobs=logps[row, :end].tolist(),
                finish_reason="stop" if int(ends[row]) else "length",
            ))
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            target = self._params.get(name)
            if target is None:
                raise KeyError(f"rollout engine has no weight named {name!r}")
            if target.shape != tensor.shape:
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != engine's {tuple(target.shape)}")
            target.data.copy_(tensor)


@ROLLOUT_ENGINES.register("torch")
def build_torch_engine(cfg: ProRLConfig, model_dir: Path) -> RolloutEngine:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TorchRolloutEngine(model_dir, device=cfg.cluster.device, dtype=cfg.model.dtype,
                              max_num_seqs=cfg.rollout.max_num_seqs, pad_token_id=pad, tokenizer=tok)
