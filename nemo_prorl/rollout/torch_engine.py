"""Embedded rollout engine: batched autoregressive sampling with a KV cache in plain PyTorch.

It holds its own copy of the model, like vLLM does, so the trainer must sync weights into it after every
update; that keeps the embedded path faithful to the distributed one."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, DynamicCache

from nemo_prorl.cluster.actors import ActorBase
from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.procs import ignore_preemption_signals
from nemo_prorl.rollout.base import ROLLOUT_ENGINES, Completion, RolloutEngine, SamplingParams, prompt_seed
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


# Prompts are left-padded to a multiple of this many tokens (their own length's bucket), see `_chunks`.
PAD_BUCKET = 16
# Decode batches are padded with idle rows to a multiple of this many rows. CPU GEMM kernels pick their
# row tiles by the row count: on an AVX2 EPYC with MKL, a row's result at 1-3 rows (or 5-7, 9-11) differs
# in the last bits from the same row at 16, while every multiple of 4 and every count >= 12 agrees. A
# multiple of 16 keeps each decode matmul on the kernels that agree (prefill rows are prompt rows times a
# PAD_BUCKET multiple, so they already are).
ROW_BUCKET = 16


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
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> list[Completion]:
        seeds = list(seeds) if seeds is not None else [prompt_seed(params.seed, i) for i in range(len(prompts))]
        out: list[Completion] = []
        # The math attention kernel: PyTorch's CPU flash-attention kernel splits its work over threads in a
        # way that changes a row's last bits with the row's place in the batch (measured with 2 threads;
        # the math kernel's per-row batched matmuls do not).
        with sdpa_kernel(SDPBackend.MATH):
            for chunk in self._chunks(prompts, params.n):
                out.extend(self._generate_chunk(chunk, prompts, params, seeds))
        return sorted(out, key=lambda c: c.prompt_index)  # stable: a prompt's samples keep their order

    def _chunks(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[tuple[int, int, int]]]:
        """Batches of (prompt index, first sample, samples) pieces. Batch-invariant by construction: a
        prompt is padded to its own length bucket (never to its batch's longest prompt) and batched only
        with prompts of that bucket, so a row sees the same shapes and the same numerics whatever else is
        generated with it (CPU matmuls are row-invariant; measured bit-identical for 1 to 256 rows); its
        random numbers come from its own generator. So a prompt's completions do not depend on the other
        prompts of the call, nor on how a step's prompts are split over engines."""
        pieces = [(i, s, min(self.max_num_seqs, n - s)) for i in range(len(prompts)) for s in range(0, n, self.max_num_seqs)]
        by_bucket: dict[int, list[tuple[int, int, int]]] = {}
        for piece in pieces:
            by_bucket.setdefault(self._bucket(len(prompts[piece[0]])), []).append(piece)
        chunks = []
        for bucket in sorted(by_bucket):
            chunk: list[tuple[int, int, int]] = []
            for piece in by_bucket[bucket]:
                if chunk and sum(p[2] for p in chunk) + piece[2] > self.max_num_seqs:
                    chunks.append(chunk)
                    chunk = []
                chunk.append(piece)
            chunks.append(chunk)
        return chunks

    @staticmethod
    def _bucket(length: int) -> int:
        return -(-length // PAD_BUCKET) * PAD_BUCKET

    def _generate_chunk(self, chunk: list[tuple[int, int, int]], prompts: Sequence[Sequence[int]],
                        params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        # The samples of a prompt share its prefill (vLLM's prefix caching does the same): each prompt runs
        # once, and its KV cache and last logits are copied to its samples' rows. With n=8 this cuts the
        # prompt tokens the model processes eightfold.
        B = sum(k for _, _, k in chunk)
        rows = -(-B // ROW_BUCKET) * ROW_BUCKET  # B sampled rows, then idle rows that copy the first prompt
        row_of = torch.tensor([j for j, (_, _, k) in enumerate(chunk) for _ in range(k)] + [0] * (rows - B),
                              device=self.device)
        P = self._bucket(max(len(prompts[i]) for i, _, _ in chunk))
        ids = torch.full((len(chunk), P), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), P), dtype=torch.long)
        for row, (i, _, _) in enumerate(chunk):  # left padding: every prompt ends at column P - 1
            ids[row, P - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.long)
            mask[row, P - len(prompts[i]) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(params.stop_token_ids or (-1,), device=self.device)
        gens = [torch.Generator(device="cpu").manual_seed(seeds[i] + s) for i, s, _ in chunk]
        spans = [(r - k, r) for r, k in zip(torch.tensor([k for _, _, k in chunk]).cumsum(0).tolist(),
                                           [k for _, _, k in chunk])]
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            **{self._cache_kw: cache}).logits[:, -1]
        if len(chunk) < rows:
            cache.batch_select_indices(row_of)
            logits, mask, pos = logits[row_of], mask[row_of], pos[row_of]
        done = torch.arange(rows, device=self.device) >= B  # idle rows are done from the start
        ends = torch.zeros(rows, dtype=torch.long)  # response length of rows that stopped (0: still going)
        idle = torch.full((rows - B, 1), self.pad_token_id, dtype=torch.long)
        tokens, logps = [], []
        last_pos = pos[:, -1]
        for t in range(params.max_tokens):
            filtered = top_p_filter(logits.float() / params.temperature, params.top_p)
            logp_all = torch.log_softmax(filtered, dim=-1)
            probs = torch.softmax(filtered, dim=-1)
            if not bool(torch.isfinite(probs).all()):
                raise FloatingPointError("rollout engine: the model's logits are not finite (the synced policy "
                                         "weights have diverged); resume from an earlier checkpoint")
            cpu_probs = probs.cpu()
            nxt = torch.cat([torch.multinomial(cpu_probs[a:b], 1, generator=g) for (a, b), g in zip(spans, gens)]
                            + [idle])
            nxt = torch.where(done, torch.full_like(nxt.squeeze(-1), self.pad_token_id).to(self.device),
                              nxt.squeeze(-1).to(self.device))
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
        jobs = [i for i, _, k in chunk for _ in range(k)]
        return self._collect(jobs, torch.stack(tokens, 1)[:B].cpu(), torch.stack(logps, 1)[:B].cpu(), ends[:B])

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
    def _collect(jobs: list[int], tokens: torch.Tensor, logps: torch.Tensor, ends: torch.Tensor) -> list[Completion]:
        out = []
        for row, prompt_index in enumerate(jobs):
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


class TorchEngineServer(ActorBase):
    """The torch engine as a Ray actor (rollout.num_engines > 1; rollout/pool.py): the same commands as
    vLLM's engine actor, weights from its node's transfer buffer."""

    def __init__(self, log_path: str) -> None:
        ignore_preemption_signals()  # the trainer checkpoints first, then stops its engines
        self.engine: Optional[TorchRolloutEngine] = None

    def init(self, spec: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        if spec.get("num_threads"):
            torch.set_num_threads(spec["num_threads"])
        tok = AutoTokenizer.from_pretrained(spec["model_dir"])
        self.engine = TorchRolloutEngine(Path(spec["model_dir"]), device=spec["device"], dtype=spec["dtype"],
                                         max_num_seqs=spec["max_num_seqs"], pad_token_id=spec["pad_token_id"],
                                         tokenizer=tok)

    def generate(self, prompts: list[list[int]], p: dict[str, Any],
                 seeds: list[int]) -> list[tuple[int, list[int], list[float], str]]:
        out = self.engine.generate(prompts, SamplingParams(**{**p, "stop_token_ids": tuple(p["stop_token_ids"]),
                                                              "stop": tuple(p["stop"])}), seeds)
        return [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason) for c in out]

    def begin_weight_update(self) -> None: ...

    def load_bucket(self, handle: tuple, metas: list[tuple[str, int, list[int], str]]) -> int:
        from nemo_prorl.rollout.vllm_server import buffer_views, finish_reads

        weights = buffer_views(self, handle, metas)
        self.engine.load_weights(weights)
        finish_reads(handle)
        return len(weights)

    def finish_weight_update(self) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...


@ROLLOUT_ENGINES.register("torch")
def build_torch_engine(cfg: ProRLConfig, model_dir: Path) -> RolloutEngine:
    from transformers import AutoTokenizer

    from nemo_prorl import cluster
    from nemo_prorl.rollout.pool import EnginePool, EngineSetup

    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plan = cluster.plan_from_config(cfg, engine="torch")
    if not plan.engines:  # one engine: in this process
        return TorchRolloutEngine(model_dir, device=cfg.cluster.device, dtype=cfg.model.dtype,
                                  max_num_seqs=cfg.rollout.max_num_seqs, pad_token_id=pad, tokenizer=tok)
    per_node = max(sum(1 for e in plan.engines if e.node == n) for n in {e.node for e in plan.engines})
    threads = cfg.cluster.num_threads or max(1, (os.cpu_count() or 1) // per_node)
    spec = dict(model_dir=str(model_dir), device=cfg.cluster.device, dtype=cfg.model.dtype,
                max_num_seqs=cfg.rollout.max_num_seqs, pad_token_id=pad, num_threads=threads)
    logs = [None] * len(plan.engines)
    return EnginePool(cfg, EngineSetup("torch engine", TorchEngineServer, spec, DTYPES[cfg.model.dtype], logs,
                                       env={"OMP_NUM_THREADS": str(threads)}), engine="torch")
