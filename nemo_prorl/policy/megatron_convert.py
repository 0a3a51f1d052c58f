"""Hugging Face <-> Megatron-core weight layout for Qwen2, Llama, Qwen3 and Qwen3-MoE (pure tensor
reshuffling; no distributed imports, so it is testable anywhere and shared by `prorl convert` and the
weight sync).

Megatron's GPTModel (local or Transformer Engine layer spec) differs from HF in these ways:
  * q, k, v are one `linear_qkv` whose rows are grouped by query group: for each KV group g, the
    (heads / groups) query heads of g, then g's key head, then g's value head. Tensor parallelism splits
    whole groups, so each rank's shard is the same layout over its groups.
  * gate and up projections are one `linear_fc1`; under TP each rank holds [gate_r; up_r].
  * row-parallel layers (`linear_proj`, `linear_fc2`) split the input dimension, column-parallel ones
    (`linear_qkv`, `linear_fc1`, embeddings, output layer) the output dimension; the vocabulary is padded
    to a multiple of TP.
  * pipeline stage p holds layers [p*L/PP, (p+1)*L/PP), numbered from 0 within the stage.
  * Qwen3's per-head q/k RMSNorms (`self_attn.{q,k}_norm`, [head_dim]) are `self_attention.{q,k}_layernorm`,
    the same on every TP rank.
  * Qwen3-MoE: the router (`mlp.gate`) is `mlp.router`, on every rank. Expert parallelism (EP) gives each
    EP rank whole experts, E/EP of them, numbered from 0 locally (`mlp.experts.local_experts.i`, global
    expert ep_rank * E/EP + i); expert tensor parallelism (ETP) splits each expert's FFN as TP splits a
    dense one (fc1 [gate_r; up_r] on the output dim, fc2 on the input dim).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from nemo_prorl.policy.base import LazyWeight

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    qkv_bias: bool  # Qwen2: True, Llama/Qwen3: False (attention_bias)
    tied_embeddings: bool = False
    kv_channels: Optional[int] = None  # Qwen3's explicit head_dim; None = hidden_size / num_heads
    qk_norm: bool = False  # Qwen3: RMSNorm of each query and key head
    num_experts: int = 0  # 0 = dense; Qwen3-MoE: every layer is an MoE layer
    moe_ffn_hidden_size: int = 0  # each expert's FFN size (moe_intermediate_size)
    moe_topk: int = 0  # num_experts_per_tok
    moe_norm_topk_prob: bool = True  # the top-k probabilities renormalised to sum to 1

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @staticmethod
    def from_hf_config(c: Any) -> "ModelShape":
        """The shape of a Qwen2, Llama, Qwen3 or Qwen3-MoE config; anything else is refused, naming the
        field we cannot convert."""
        kind = getattr(c, "model_type", None)
        if kind not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json model_type={kind!r}: only {', '.join(SUPPORTED_MODEL_TYPES)} convert")
        _refuse_unsupported(c)
        head_dim = getattr(c, "head_dim", None)
        # Llama/Qwen2 configs may carry head_dim too: keep None (the hidden/heads default) when it agrees
        explicit = kind.startswith("qwen3") or (head_dim and head_dim != c.hidden_size // c.num_attention_heads)
        moe = kind == "qwen3_moe"
        return ModelShape(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                          num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                          ffn_hidden_size=c.intermediate_size, vocab_size=c.vocab_size,
                          qkv_bias=kind == "qwen2" or bool(getattr(c, "attention_bias", False)),
                          tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                          kv_channels=(head_dim or c.hidden_size // c.num_attention_heads) if explicit else None,
                          qk_norm=kind.startswith("qwen3"),
                          num_experts=c.num_experts if moe else 0,
                          moe_ffn_hidden_size=c.moe_intermediate_size if moe else 0,
                          moe_topk=c.num_experts_per_tok if moe else 0,
                          moe_norm_topk_prob=bool(getattr(c, "norm_topk_prob", True)) if moe else True)


def _refuse_unsupported(c: Any) -> None:
    """Config fields whose models the mapping (or the Megatron model we build) would get wrong."""
    problems = []
    if getattr(c, "use_sliding_window", False):
        problems.append("use_sliding_window=True (sliding-window attention)")
    if getattr(c, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c.hidden_act!r} (SwiGLU with silu only)")
    if c.model_type == "qwen3_moe":
        if not getattr(c, "num_experts", 0):
            problems.append("num_experts=0 (a Qwen3-MoE without experts)")
        if getattr(c, "decoder_sparse_step", 1) != 1:
            problems.append(f"decoder_sparse_step={c.decoder_sparse_step} (dense layers between MoE layers)")
        if getattr(c, "mlp_only_layers", None):
            problems.append(f"mlp_only_layers={list(c.mlp_only_layers)} (dense layers among MoE layers)")
        if getattr(c, "shared_expert_intermediate_size", 0):
            problems.append("shared_expert_intermediate_size (shared experts)")
    if problems:
        raise ValueError(f"config.json ({c.model_type}): cannot convert " + "; ".join(problems))


def padded_vocab(vocab: int, tp: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of `multiple * tp` (make_vocab_size_divisible_by)."""
    step = multiple * tp
    return -(-vocab // step) * step


def _stage_layers(shape: ModelShape, pp_rank: int, pp: int) -> range:
    if shape.num_layers % pp:
        raise ValueError(f"{shape.num_layers} layers do not split evenly over {pp} pipeline stages")
    per = shape.num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def _qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: ModelShape) -> torch.Tensor:
    """Interleave by query group: [g0: q heads, k, v][g1: ...] (works for weights and biases)."""
    g, d = s.num_kv_heads, s.head_dim
    per = s.num_heads // g
    rest = q.shape[1:]
    q = q.reshape(g, per * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(g * (per + 2) * d, *rest)


def _split_qkv(qkv: torch.Tensor, s: ModelShape) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The q, k and v rows of an interleaved qkv, one view per query group (concatenated, they are the
    HF q_proj, k_proj and v_proj of these groups). Views, not copies: see LazyWeight."""
    g, d = s.num_kv_heads, s.head_dim
    per = s.num_heads // g
    x = qkv.view(g, (per + 2) * d, *qkv.shape[1:])
    return ([x[i, : per * d] for i in range(g)], [x[i, per * d : (per + 1) * d] for i in range(g)],
            [x[i, (per + 1) * d :] for i in range(g)])


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    return w if w.shape[0] == rows else torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def _col(w: torch.Tensor, n: int, rank: int) -> torch.Tensor:  # column-parallel: split the output dimension
    return w.chunk(n, dim=0)[rank].clone()


def _row(w: torch.Tensor, n: int, rank: int) -> torch.Tensor:  # row-parallel: split the input dimension
    return w.chunk(n, dim=1)[rank].clone()


def _hf_expert(hf: Mapping[str, torch.Tensor], prefix: str, e: int, kind: str) -> torch.Tensor:
    """Expert e's gate/up/down matrix of layer `prefix` (model.layers.L.mlp.experts.): the per-expert
    checkpoint name, or a view of transformers' fused in-memory parameter (a model's own state_dict())."""
    name = f"{prefix}{e}.{kind}_proj.weight"
    if name in hf:
        return hf[name]
    from nemo_prorl.policy.hf_experts import DOWN, GATE_UP, slot_view

    fused = prefix + (DOWN if kind == "down" else GATE_UP)
    if fused not in hf:
        raise KeyError(f"{name} (or the fused {fused}) is not in the checkpoint")
    return slot_view(hf[fused], e, kind)


def _check_split(s: ModelShape, tp: int, ep: int, etp: int) -> None:
    if s.num_kv_heads % tp or s.ffn_hidden_size % tp:
        raise ValueError(f"TP={tp} must divide the {s.num_kv_heads} KV heads and ffn size {s.ffn_hidden_size}")
    if s.is_moe and (s.num_experts % ep or s.moe_ffn_hidden_size % etp):
        raise ValueError(f"expert_parallel_size={ep} must divide the {s.num_experts} experts and "
                         f"expert_tensor_parallel_size={etp} the expert ffn size {s.moe_ffn_hidden_size}")
    if not s.is_moe and (ep != 1 or etp != tp):
        raise ValueError(f"expert_parallel_size={ep} / expert_tensor_parallel_size={etp}: a dense model has no experts")


def _attention_to_megatron(hf: Mapping[str, torch.Tensor], s: ModelShape, a: str, m: str, tp: int,
                           tp_rank: int) -> dict[str, torch.Tensor]:
    out = {m + "self_attention.linear_qkv.weight": _col(_qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"],
                                                             hf[a + "v_proj.weight"], s), tp, tp_rank)}
    if s.qkv_bias:
        out[m + "self_attention.linear_qkv.bias"] = _col(_qkv(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"],
                                                              hf[a + "v_proj.bias"], s), tp, tp_rank)
    if s.qk_norm:
        out[m + "self_attention.q_layernorm.weight"] = hf[a + "q_norm.weight"].clone()
        out[m + "self_attention.k_layernorm.weight"] = hf[a + "k_norm.weight"].clone()
    out[m + "self_attention.linear_proj.weight"] = _row(hf[a + "o_proj.weight"], tp, tp_rank)
    return out


def _mlp_to_megatron(hf: Mapping[str, torch.Tensor], s: ModelShape, h: str, m: str, *, tp: int, tp_rank: int,
                     ep: int, ep_rank: int, etp: int, etp_rank: int) -> dict[str, torch.Tensor]:
    if not s.is_moe:
        gate, up = _col(hf[h + "mlp.gate_proj.weight"], tp, tp_rank), _col(hf[h + "mlp.up_proj.weight"], tp, tp_rank)
        return {m + "mlp.linear_fc1.weight": torch.cat([gate, up]),
                m + "mlp.linear_fc2.weight": _row(hf[h + "mlp.down_proj.weight"], tp, tp_rank)}
    out = {m + "mlp.router.weight": hf[h + "mlp.gate.weight"].clone()}
    local = s.num_experts // ep
    for i in range(local):
        e, x = ep_rank * local + i, f"{m}mlp.experts.local_experts.{i}."
        gate = _col(_hf_expert(hf, h + "mlp.experts.", e, "gate"), etp, etp_rank)
        up = _col(_hf_expert(hf, h + "mlp.experts.", e, "up"), etp, etp_rank)
        out[x + "linear_fc1.weight"] = torch.cat([gate, up])
        out[x + "linear_fc2.weight"] = _row(_hf_expert(hf, h + "mlp.experts.", e, "down"), etp, etp_rank)
    return out


def hf_to_megatron(hf: Mapping[str, torch.Tensor], s: ModelShape, *, tp_rank: int = 0, tp: int = 1,
                   pp_rank: int = 0, pp: int = 1, vocab_multiple: int = 128, ep_rank: int = 0, ep: int = 1,
                   etp_rank: Optional[int] = None, etp: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The Megatron state dict of one (tp_rank, pp_rank, ep_rank, etp_rank) shard. Experts are split over
    EP (whole experts) and expert-TP `etp` (None: = TP, with etp_rank = tp_rank); dense weights over TP."""
    etp = tp if etp is None else etp
    etp_rank = (tp_rank if etp == tp else 0) if etp_rank is None else etp_rank
    _check_split(s, tp, ep, etp)
    out: dict[str, torch.Tensor] = {}
    vocab = padded_vocab(s.vocab_size, tp, vocab_multiple)
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = _col(_pad_rows(hf["model.embed_tokens.weight"], vocab), tp, tp_rank)
    for local, layer in enumerate(_stage_layers(s, pp_rank, pp)):
        h, m = f"model.layers.{layer}.", f"decoder.layers.{local}."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"].clone()
        out.update(_attention_to_megatron(hf, s, h + "self_attn.", m, tp, tp_rank))
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"].clone()
        out.update(_mlp_to_megatron(hf, s, h, m, tp=tp, tp_rank=tp_rank, ep=ep, ep_rank=ep_rank, etp=etp,
                                    etp_rank=etp_rank))
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
        if not (s.tied_embeddings and pp == 1):  # a single stage uses the embedding itself as the output layer
            head = hf["model.embed_tokens.weight"] if s.tied_embeddings else hf["lm_head.weight"]
            out["output_layer.weight"] = _col(_pad_rows(head, vocab), tp, tp_rank)
    return out


def _first_rows(parts: list[torch.Tensor], n: int) -> tuple[torch.Tensor, ...]:
    """The pieces cut to their first n rows in total (drops the vocabulary padding of the last ranks)."""
    out = []
    for p in parts:
        if n <= 0:
            break
        out.append(p[: min(n, p.shape[0])])
        n -= p.shape[0]
    return tuple(out)


Shards = Sequence[Sequence[Mapping[str, torch.Tensor]]]


def _experts_to_hf(experts: Sequence[Sequence[Mapping[str, torch.Tensor]]], s: ModelShape, h: str,
                   m: str) -> Iterator[LazyWeight]:
    """Layer h's experts from `experts[ep_rank][etp_rank]` (the stage's expert shards), in expert order."""
    local = s.num_experts // len(experts)
    for ep_rank, row in enumerate(experts):
        for i in range(local):
            x, e = f"{m}mlp.experts.local_experts.{i}.", ep_rank * local + i
            fc1 = [sd[x + "linear_fc1.weight"].chunk(2, dim=0) for sd in row]  # [gate_r; up_r] per expert-TP rank
            fc2 = tuple(sd[x + "linear_fc2.weight"] for sd in row)
            yield LazyWeight(f"{h}mlp.experts.{e}.gate_proj.weight", tuple(g for g, _ in fc1))
            yield LazyWeight(f"{h}mlp.experts.{e}.up_proj.weight", tuple(u for _, u in fc1))
            yield LazyWeight(f"{h}mlp.experts.{e}.down_proj.weight", fc2, dim=1)


def _layer_to_hf(stage_shards: Sequence[Mapping[str, torch.Tensor]], s: ModelShape, h: str, m: str,
                 stage_experts: Optional[Sequence[Sequence[Mapping[str, torch.Tensor]]]]) -> Iterator[LazyWeight]:
    tp, first, a = len(stage_shards), stage_shards[0], h + "self_attn."

    def col(name: str) -> list[torch.Tensor]:
        return [sd[name] for sd in stage_shards]

    yield LazyWeight(h + "input_layernorm.weight", (first[m + "input_layernorm.weight"],))
    for kind in ("weight", "bias") if s.qkv_bias else ("weight",):
        # each TP shard is the interleaved layout of its own query groups
        parts = [_split_qkv(x, _shard_shape(s, tp)) for x in col(m + "self_attention.linear_qkv." + kind)]
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            yield LazyWeight(f"{a}{name}.{kind}", tuple(v for p in parts for v in p[i]))
    if s.qk_norm:
        yield LazyWeight(a + "q_norm.weight", (first[m + "self_attention.q_layernorm.weight"],))
        yield LazyWeight(a + "k_norm.weight", (first[m + "self_attention.k_layernorm.weight"],))
    yield LazyWeight(a + "o_proj.weight", tuple(col(m + "self_attention.linear_proj.weight")), dim=1)
    yield LazyWeight(h + "post_attention_layernorm.weight", (first[m + "pre_mlp_layernorm.weight"],))
    if s.is_moe:
        yield LazyWeight(h + "mlp.gate.weight", (first[m + "mlp.router.weight"],))
        yield from _experts_to_hf(stage_experts if stage_experts is not None else [stage_shards], s, h, m)
        return
    fc1 = [x.chunk(2, dim=0) for x in col(m + "mlp.linear_fc1.weight")]  # [gate_r; up_r] per rank
    yield LazyWeight(h + "mlp.gate_proj.weight", tuple(g for g, _ in fc1))
    yield LazyWeight(h + "mlp.up_proj.weight", tuple(u for _, u in fc1))
    yield LazyWeight(h + "mlp.down_proj.weight", tuple(col(m + "mlp.linear_fc2.weight")), dim=1)


def megatron_to_hf_lazy(shards: Shards, s: ModelShape,
                        experts: Optional[Sequence[Sequence[Sequence[Mapping[str, torch.Tensor]]]]] = None
                        ) -> Iterator[LazyWeight]:
    """The HF weights of all shards, `shards[pp_rank][tp_rank]`, in HF order, as views of the shards:
    nothing is gathered until a weight is materialised (see LazyWeight). MoE models: `experts[stage][ep_rank]
    [etp_rank]` is a state dict holding that rank's local experts (None: EP=1 and expert-TP = TP, the experts
    are in `shards`); expert weights come out under their per-expert checkpoint names."""
    pp = len(shards)
    yield LazyWeight("model.embed_tokens.weight",
                     _first_rows([sd["embedding.word_embeddings.weight"] for sd in shards[0]], s.vocab_size))
    for stage in range(pp):
        for local, layer in enumerate(_stage_layers(s, stage, pp)):
            yield from _layer_to_hf(shards[stage], s, f"model.layers.{layer}.", f"decoder.layers.{local}.",
                                    experts[stage] if experts is not None else None)
    yield LazyWeight("model.norm.weight", (shards[pp - 1][0]["decoder.final_layernorm.weight"],))
    if not s.tied_embeddings:
        heads = [sd["output_layer.weight"] for sd in shards[pp - 1]]
        yield LazyWeight("lm_head.weight", _first_rows(heads, s.vocab_size))


def megatron_to_hf(shards: Shards, s: ModelShape,
                   experts: Optional[Sequence[Sequence[Sequence[Mapping[str, torch.Tensor]]]]] = None
                   ) -> dict[str, torch.Tensor]:
    """The HF state dict from all shards (see megatron_to_hf_lazy; new tensors, sharing nothing)."""
    return {w.name: w.materialize(torch.empty(w.shape, dtype=w.dtype)) for w in megatron_to_hf_lazy(shards, s, experts)}


def _shard_shape(s: ModelShape, tp: int) -> ModelShape:
    """The head counts one TP rank holds (its qkv shard is laid out like a model with these)."""
    return replace(s, hidden_size=s.hidden_size // tp, num_heads=s.num_heads // tp, num_kv_heads=s.num_kv_heads // tp,
                   ffn_hidden_size=s.ffn_hidden_size // tp, kv_channels=s.head_dim)


_LAYER = re.compile(r"^(?P<layer>(?:.*\.)?decoder\.layers\.\d+\.)(?P<rest>.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(?P<i>\d+)\.(?P<fc>linear_fc[12])\.weight$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(?P<fc>linear_fc[12])\.weight(?P<i>\d+)$")


def to_te_names(shard: Mapping[str, torch.Tensor], *, grouped_experts: bool) -> dict[str, torch.Tensor]:
    """A shard in the local spec's names (what hf_to_megatron makes) under Transformer Engine's layer spec
    names: the input norm is fused into `linear_qkv` (`layer_norm_weight`), a dense layer's pre-MLP norm into
    `mlp.linear_fc1`, an MoE layer keeps its own `pre_mlp_layernorm`; with the grouped GEMM (TEGroupedMLP)
    local expert i's `linear_fc{1,2}.weight` is `mlp.experts.linear_fc{1,2}.weight{i}`. Same tensors."""
    moe_layers = {m["layer"] for k in shard if (m := _LAYER.match(k)) and m["rest"] == "mlp.router.weight"}
    out: dict[str, torch.Tensor] = {}
    for name, t in shard.items():
        m = _LAYER.match(name)
        layer, rest = (m["layer"], m["rest"]) if m else ("", "")
        if rest == "input_layernorm.weight":
            name = layer + "self_attention.linear_qkv.layer_norm_weight"
        elif rest == "pre_mlp_layernorm.weight" and layer not in moe_layers:
            name = layer + "mlp.linear_fc1.layer_norm_weight"
        elif grouped_experts and (e := _LOCAL_EXPERT.match(rest)):
            name = f"{layer}mlp.experts.{e['fc']}.weight{e['i']}"
        out[name] = t
    return out


def from_te_names(shard: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `to_te_names` (either flavour): local-spec names, as megatron_to_hf_lazy reads them."""
    out: dict[str, torch.Tensor] = {}
    for name, t in shard.items():
        m = _LAYER.match(name)
        layer, rest = (m["layer"], m["rest"]) if m else ("", "")
        if rest == "self_attention.linear_qkv.layer_norm_weight":
            name = layer + "input_layernorm.weight"
        elif rest == "mlp.linear_fc1.layer_norm_weight":
            name = layer + "pre_mlp_layernorm.weight"
        elif e := _GROUPED_EXPERT.match(rest):
            name = f"{layer}mlp.experts.local_experts.{e['i']}.{e['fc']}.weight"
        out[name] = t
    return out


class LazyHFWeights(Mapping[str, torch.Tensor]):
    """The tensors of a Hugging Face folder (model.safetensors, or shards with an index), read one at a
    time on access: each Megatron rank reads only what its shard needs, never the whole model."""

    def __init__(self, model_dir: str | Path) -> None:
        d = Path(model_dir)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            self._files = {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (d / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(d / "model.safetensors", "pt") as f:
                self._files = {k: d / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._files:
            raise KeyError(f"{name} is not in the checkpoint")
        with safe_open(self._files[name], "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._files


def lazy_hf_weights(model_dir: str | Path) -> LazyHFWeights:
    return LazyHFWeights(model_dir)
