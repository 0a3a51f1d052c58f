"""Embedded rollout engine: batched autoregressive sampling with a KV cache in plain PyTorch.

It holds its own copy of the model, like vLLM does, so the trainer must sync weights into it after every
update; that keeps the embedded path faithful to the distributed one.

Weight updates may land while it generates (asynchronous GRPO; NeMo-RL and AReaL do the same): an update
(begin_weight_update .. finish_weight_update, from any thread) waits until the generating loop is between
two model calls and holds it there until the last bucket is in. The running requests then go on with the
new weights: the loop first rebuilds its KV cache with them (a prefill over prompt + response so far, as
AReaL's interruptible generation does), so every token's logprob is what the policy of the token's version
computes for the whole sequence, and `Completion.versions` records which version that was.

Mixture-of-experts models with rollout.routing_replay: every model call records the experts each MoE layer
picked (policy/routing.py's router hooks), kept per row beside the KV cache; a rebuild after an update
records them again, so a token keeps the routing of the latest forward that computed it, as its KV does."""

from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM, DynamicCache

from nemo_prorl.cluster.actors import ActorBase
from nemo_prorl.config.schema import ProRLConfig
from nemo_prorl.procs import ignore_preemption_signals
from nemo_prorl.rollout.base import (ROLLOUT_ENGINES, Completion, RolloutEngine, SamplingParams, WeightGate,
                                     prompt_seed)
from nemo_prorl.rollout.shared_prefix import held_bytes, reshare_rows, share_prompts
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
    in_flight_updates = True  # weights may change between two decode steps (see the module docstring)

    def __init__(self, model_dir: Path, *, device: str, dtype: str, max_num_seqs: int, pad_token_id: int,
                 tokenizer: Optional[Any] = None, record_routing: bool = False,
                 share_prompt_cache: bool = True) -> None:
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
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.version = 0
        self._gate = WeightGate()  # model calls are its readers, a weight update its writer
        # Called with t (>= 1) by the generating thread before the model call that gives the logits of response
        # token t, outside the gate: where a test lands a weight update at a known step (None: nothing).
        self.step_hook: Optional[Callable[[int], None]] = None
        self._routing = self._routing_hooks() if record_routing else None
        # rollout.share_prompt_cache: a prompt's KV cache held once for its samples (rollout/shared_prefix.py)
        self.share_prompt_cache = share_prompt_cache
        # Benchmarks and tests: the most KV-cache bytes a generate call held after a model call (None: not
        # measured; measuring walks the cache's layers once per step).
        self.track_cache_bytes = False
        self.peak_cache_bytes: Optional[int] = None

    def _routing_hooks(self) -> Any:
        # Imported here: rollout/ reaches into policy/ only where it must (policy/__init__ builds backends).
        from nemo_prorl.policy.routing import MoERouting

        routing = MoERouting(self.model)
        if not routing.num_layers:
            raise ValueError(f"rollout.routing_replay=true needs a mixture-of-experts policy; "
                             f"{type(self.model).__name__} has no MoE router")
        return routing

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> list[Completion]:
        seeds = list(seeds) if seeds is not None else [prompt_seed(params.seed, i) for i in range(len(prompts))]
        out: list[Completion] = []
        # The math attention kernel: PyTorch's CPU flash-attention kernel splits its work over threads in a
        # way that changes a row's last bits with the row's place in the batch (measured with 2 threads;
        # the math kernel's per-row batched matmuls do not).
        self.peak_cache_bytes = 0 if self.track_cache_bytes else None
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
        # once, and its last logits go to its samples' rows. With n=8 this cuts the prompt tokens the model
        # processes eightfold. Its KV cache is shared by those rows (rollout.share_prompt_cache), or copied to
        # each of them (the same tokens, bit for bit; memory grows with n x prompt length).
        B = sum(k for _, _, k in chunk)
        rows = -(-B // ROW_BUCKET) * ROW_BUCKET  # B sampled rows, then idle rows that copy the first prompt
        row_of = torch.tensor([j for j, (_, _, k) in enumerate(chunk) for _ in range(k)] + [0] * (rows - B),
                              device=self.device)
        ids, mask, pos = self._prompt_batch([prompts[i] for i, _, _ in chunk])
        P = ids.shape[1]
        stop = torch.tensor(params.stop_token_ids or (-1,), device=self.device)
        gens = [torch.Generator(device="cpu").manual_seed(seeds[i] + s) for i, s, _ in chunk]
        spans = [(r - k, r) for r, k in zip(torch.tensor([k for _, _, k in chunk]).cumsum(0).tolist(),
                                           [k for _, _, k in chunk])]
        with self._gate.reading():
            cache_version = self.version  # the weights the KV cache (and the logits) come from
            logits, cache = self._prefill(ids, mask, pos)
        # Routing replay: the routing of the latest prefill [rows, columns, layers, k], then one column per
        # decode step after it (concatenated once, at the end)
        routes = [self._routing.take(len(chunk))] if self._routing else None
        shared = self.share_prompt_cache and len(chunk) < rows  # one row per prompt: nothing to share
        if len(chunk) < rows:  # one prefill row per prompt, fanned out to its samples' rows
            if shared:
                cache = share_prompts(cache, row_of)
            else:
                cache.batch_select_indices(row_of)
            logits, mask, pos = logits[row_of], mask[row_of], pos[row_of]
            routes = [routes[0][row_of]] if routes is not None else None
        done = torch.arange(rows, device=self.device) >= B  # idle rows are done from the start
        ends = torch.zeros(rows, dtype=torch.long)  # response length of rows that stopped (0: still going)
        idle = torch.full((rows - B, 1), self.pad_token_id, dtype=torch.long)
        tokens, logps, versions = [], [], []
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
            versions.append(cache_version)
            live = ~done
            stopped = live & (torch.isin(nxt, stop) | self._stop_string_hit(tokens, live, params.stop))
            ends[stopped.cpu()] = t + 1
            done = done | stopped
            if bool(done.all()):
                break
            # Finished rows keep decoding padding that nothing attends to; it is cut out below.
            mask = torch.cat([mask, live.long().unsqueeze(-1)], dim=-1)
            last_pos = last_pos + live.long()
            if self.step_hook is not None:
                self.step_hook(t + 1)
            rebuilt_from = cache_version
            logits, cache, cache_version = self._next_logits(
                nxt, mask, last_pos, cache, cache_version, lambda: torch.cat([ids[row_of], torch.stack(tokens, 1)], 1))
            if cache_version != rebuilt_from and shared:
                cache = reshare_rows(cache, row_of, P)
            if self.peak_cache_bytes is not None:
                self.peak_cache_bytes = max(self.peak_cache_bytes, held_bytes(cache))
            if routes is not None:
                new = self._routing.take(rows)
                # a rebuild's prefill covers every column: it replaces what the earlier weights routed
                routes = routes + [new] if new.shape[1] == 1 else [new]
        jobs = [i for i, _, k in chunk for _ in range(k)]
        out = self._collect(jobs, torch.stack(tokens, 1)[:B].cpu(), torch.stack(logps, 1)[:B].cpu(), ends[:B],
                            versions)
        if routes is not None:
            routes = torch.cat(routes, 1)[:B].cpu()
            for row, c in enumerate(out):  # the prompt's columns, then every response token but the last
                c.routed_experts = routes[row, P - len(prompts[c.prompt_index]) : P + len(c.token_ids) - 1].clone()
        return out

    def _prompt_batch(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, attention mask and positions of `prompts`, left-padded to their length bucket: every
        prompt ends at the last column."""
        P = self._bucket(max(len(p) for p in prompts))
        ids = torch.full((len(prompts), P), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, P - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, P - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 last_only: bool = False) -> tuple[torch.Tensor, DynamicCache]:
        """The last column's logits and a new KV cache of the whole of `ids`. `last_only`: the model computes
        the last column's logits alone (a rebuild over a long response would otherwise hold [rows, tokens,
        vocab] logits); the first prefill keeps its computation as it was, bit for bit."""
        cache = DynamicCache()
        keep = {"logits_to_keep": 1} if last_only and self._keeps_logits else {}
        with self._recording():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                **{self._cache_kw: cache}, **keep).logits[:, -1]
        return logits, cache

    def _recording(self) -> Any:
        return self._routing.recording() if self._routing else contextlib.nullcontext()

    def _next_logits(self, nxt: torch.Tensor, mask: torch.Tensor, last_pos: torch.Tensor, cache: DynamicCache,
                     cache_version: int,
                     sequence: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, DynamicCache, int]:
        """The logits after `nxt` (the newest column of `mask`), between two weight updates: a decode step on
        `cache`, or, when the weights changed since `cache` was built (a key or value of the old weights
        would mix two policies), a prefill of the whole `sequence()` (prompt rows + every sampled token, idle
        and finished rows included) with the decode loop's mask and positions: masked columns repeat the
        position before them, as the decode loop gives them. Returns (logits, cache, version)."""
        with self._gate.reading():
            version = self.version
            if version != cache_version:
                logits, cache = self._prefill(sequence(), mask, (mask.cumsum(-1) - 1).clamp(min=0), last_only=True)
                return logits, cache, version
            with self._recording():
                logits = self.model(input_ids=nxt.unsqueeze(-1), attention_mask=mask,
                                    position_ids=last_pos.unsqueeze(-1), use_cache=True,
                                    **{self._cache_kw: cache}).logits[:, -1]
            return logits, cache, version

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
    def _collect(jobs: list[int], tokens: torch.Tensor, logps: torch.Tensor, ends: torch.Tensor,
                 versions: list[int]) -> list[Completion]:
        out = []
        for row, prompt_index in enumerate(jobs):
            end = int(ends[row]) or tokens.shape[1]
            out.append(Completion(
                prompt_index=prompt_index,
                token_ids=tokens[row, :end].tolist(),
                logprobs=logps[row, :end].tolist(),
                finish_reason="stop" if int(ends[row]) else "length",
                versions=versions[:end],
            ))
        return out

    # ------------------------------------------------------------------ weight updates (any thread)
    def begin_weight_update(self) -> None:
        """Wait until no model call runs, and keep generation paused between two model calls until
        finish_weight_update (or abort_weight_update). Not from a generating thread inside a model call;
        its step_hook is outside one."""
        self._gate.begin()

    def finish_weight_update(self, version: Optional[int] = None) -> None:
        super().finish_weight_update(version)  # still paused: no step sees the version before the weights
        self._gate.end()

    def abort_weight_update(self) -> None:
        self._gate.end()

    def wait_for_version(self, version: int, timeout_s: float) -> None:
        """Block until a weight update has brought the engine to `version` (or later); call it outside a model
        call (a step_hook)."""
        if not self._gate.wait_for(lambda: self.version >= version, timeout_s):
            raise TimeoutError(f"rollout engine: no weight update to version {version} within {timeout_s:g}s "
                               f"(at version {self.version})")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # While another thread generates, only between begin_weight_update and finish_weight_update.
        for name, tensor in weights:
            target = self._params.get(name)
            if target is None:
                # a MoE model's per-expert (checkpoint) name: its slice of transformers' fused experts parameter
                from nemo_prorl.policy.hf_experts import resolve

                target = resolve(self._params, name)
            if target is None:
                raise KeyError(f"rollout engine has no weight named {name!r}")
            if target.shape != tensor.shape:
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != engine's {tuple(target.shape)}")
            target.data.copy_(tensor)


class TorchEngineServer(ActorBase):
    """The torch engine as a Ray actor (rollout.num_engines > 1, async steps; rollout/pool.py): the same
    commands as vLLM's engine actor, weights from its node's transfer buffer. EnginePool runs its weight
    commands (begin_weight_update, load_bucket, finish_weight_update, abort_weight_update) in a thread of
    their own (the "weights" concurrency group), so that they land while `generate` runs."""

    in_flight_updates = True

    def __init__(self, log_path: str) -> None:
        ignore_preemption_signals()  # the trainer checkpoints first, then stops its engines
        self.engine: Optional[TorchRolloutEngine] = None
        self._holding = False

    def init(self, spec: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        if spec.get("num_threads"):
            torch.set_num_threads(spec["num_threads"])
        tok = AutoTokenizer.from_pretrained(spec["model_dir"])
        self.engine = TorchRolloutEngine(Path(spec["model_dir"]), device=spec["device"], dtype=spec["dtype"],
                                         max_num_seqs=spec["max_num_seqs"], pad_token_id=spec["pad_token_id"],
                                         tokenizer=tok, record_routing=bool(spec.get("record_routing")),
                                         share_prompt_cache=spec.get("share_prompt_cache", True))
        if spec.get("test_hold_at_step"):
            self.engine.step_hook = self._hold_hook(*spec["test_hold_at_step"])

    def _hold_hook(self, step: int, version: int, timeout_s: float = 300.0) -> Callable[[int], None]:
        """Tests only (spec "test_hold_at_step": [step, version]): every generate call waits before the model
        call of response token `step` until the engine holds weights of `version`, so that an update lands
        at a known place; `test_holding` says when a call waits there."""
        def hook(t: int) -> None:
            if t == step and self.engine.version < version:
                self._holding = True
                try:
                    self.engine.wait_for_version(version, timeout_s)
                finally:
                    self._holding = False
        return hook

    def test_holding(self) -> bool:
        return self._holding

    def generate(self, prompts: list[list[int]], p: dict[str, Any], seeds: list[int]
                 ) -> list[tuple[int, list[int], list[float], str, list[int], Optional[torch.Tensor]]]:
        """Completions as plain data and tensors (routed experts: an int16 tensor, or None)."""
        out = self.engine.generate(prompts, SamplingParams(**{**p, "stop_token_ids": tuple(p["stop_token_ids"]),
                                                              "stop": tuple(p["stop"])}), seeds)
        return [(c.prompt_index, c.token_ids, c.logprobs, c.finish_reason, c.versions, c.routed_experts) for c in out]

    def begin_weight_update(self) -> None:
        self.engine.begin_weight_update()

    def load_bucket(self, handle: tuple, metas: list[tuple[str, int, list[int], str]]) -> int:
        from nemo_prorl.rollout.vllm_server import buffer_views, finish_reads

        weights = buffer_views(self, handle, metas)
        self.engine.load_weights(weights)
        finish_reads(handle)
        return len(weights)

    def finish_weight_update(self, version: Optional[int] = None) -> None:
        self.engine.finish_weight_update(version)

    def abort_weight_update(self) -> None:
        self.engine.abort_weight_update()

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...


def pool_setup(cfg: ProRLConfig, model_dir: Path, plan: Any, pad_token_id: int) -> Any:
    """The EngineSetup of `plan`'s torch engine actors."""
    from nemo_prorl.rollout.pool import EngineSetup

    per_node = max(sum(1 for e in plan.engines if e.node == n) for n in {e.node for e in plan.engines})
    threads = cfg.cluster.num_threads or max(1, (os.cpu_count() or 1) // per_node)
    spec = dict(model_dir=str(model_dir), device=cfg.cluster.device, dtype=cfg.model.dtype,
                max_num_seqs=cfg.rollout.max_num_seqs, pad_token_id=pad_token_id, num_threads=threads,
                record_routing=cfg.rollout.routing_replay, share_prompt_cache=cfg.rollout.share_prompt_cache)
    logs = [None] * len(plan.engines)
    return EngineSetup("torch engine", TorchEngineServer, spec, DTYPES[cfg.model.dtype], logs,
                       env={"OMP_NUM_THREADS": str(threads)})


@ROLLOUT_ENGINES.register("torch")
def build_torch_engine(cfg: ProRLConfig, model_dir: Path) -> RolloutEngine:
    from transformers import AutoTokenizer

    from nemo_prorl import cluster
    from nemo_prorl.rollout.pool import EnginePool

    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plan = cluster.plan_from_config(cfg, engine="torch")
    if not plan.engines:  # one engine: in this process
        return TorchRolloutEngine(model_dir, device=cfg.cluster.device, dtype=cfg.model.dtype,
                                  max_num_seqs=cfg.rollout.max_num_seqs, pad_token_id=pad, tokenizer=tok,
                                  record_routing=cfg.rollout.routing_replay,
                                  share_prompt_cache=cfg.rollout.share_prompt_cache)
    return EnginePool(cfg, pool_setup(cfg, model_dir, plan, pad), engine="torch")
