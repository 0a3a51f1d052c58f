"""Hugging Face <-> Megatron-core weight layout for Qwen2 and Llama (pure tensor reshuffling; no
distributed imports, so it is testable anywhere and shared by `prorl convert` and the weight sync).

Megatron's GPTModel (local or Transformer Engine layer spec) differs from HF in four ways:
  * q, k, v are one `linear_qkv` whose rows are grouped by query group: for each KV group g, the
    (heads / groups) query heads of g, then g's key head, then g's value head. Tensor parallelism splits
    whole groups, so each rank's shard is the same layout over its groups.
  * gate and up projections are one `linear_fc1`; under TP each rank holds [gate_r; up_r].
  * row-parallel layers (`linear_proj`, `linear_fc2`) split the input dimension, column-parallel ones
    (`linear_qkv`, `linear_fc1`, embeddings, output layer) the output dimension; the vocabulary is padded
    to a multiple of TP.
  * pipeline stage p holds layers [p*L/PP, (p+1)*L/PP), numbered from 0 within the stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from nemo_prorl.policy.base import LazyWeight


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    qkv_bias: bool  # Qwen2: True, Llama: False
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @staticmethod
    def from_hf_config(c) -> "ModelShape":
        return ModelShape(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                          num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                          ffn_hidden_size=c.intermediate_size, vocab_size=c.vocab_size,
                          qkv_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
                          tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)))


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


def hf_to_megatron(hf: Mapping[str, torch.Tensor], s: ModelShape, *, tp_rank: int = 0, tp: int = 1,
                   pp_rank: int = 0, pp: int = 1, vocab_multiple: int = 128) -> dict[str, torch.Tensor]:
    """The Megatron state dict of one (tp_rank, pp_rank) shard."""
    if s.num_kv_heads % tp or s.ffn_hidden_size % tp:
        raise ValueError(f"TP={tp} must divide the {s.num_kv_heads} KV heads and ffn size {s.ffn_hidden_size}")

    def col(w: torch.Tensor) -> torch.Tensor:  # split the output dimension
        return w.chunk(tp, dim=0)[tp_rank].clone()

    def row(w: torch.Tensor) -> torch.Tensor:  # split the input dimension
        return w.chunk(tp, dim=1)[tp_rank].clone()

    out: dict[str, torch.Tensor] = {}
    vocab = padded_vocab(s.vocab_size, tp, vocab_multiple)
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = col(_pad_rows(hf["model.embed_tokens.weight"], vocab))
    for local, layer in enumerate(_stage_layers(s, pp_rank, pp)):
        h, m = f"model.layers.{layer}.", f"decoder.layers.{local}."
        a = h + "self_attn."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"].clone()
        out[m + "self_attention.linear_qkv.weight"] = col(_qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"],
                                                               hf[a + "v_proj.weight"], s))
        if s.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = col(_qkv(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"],
                                                                 hf[a + "v_proj.bias"], s))
        out[m + "self_attention.linear_proj.weight"] = row(hf[a + "o_proj.weight"])
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"].clone()
        gate, up = col(hf[h + "mlp.gate_proj.weight"]), col(hf[h + "mlp.up_proj.weight"])
        out[m + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
        out[m + "mlp.linear_fc2.weight"] = row(hf[h + "mlp.down_proj.weight"])
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
        if not (s.tied_embeddings and pp == 1):  # a single stage uses the embedding itself as the output layer
            head = hf["model.embed_tokens.weight"] if s.tied_embeddings else hf["lm_head.weight"]
            out["output_layer.weight"] = col(_pad_rows(head, vocab))
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


def megatron_to_hf_lazy(shards: list[list[Mapping[str, torch.Tensor]]], s: ModelShape) -> Iterator[LazyWeight]:
    """The HF weights of all shards, `shards[pp_rank][tp_rank]`, in HF order, as views of the shards:
    nothing is gathered until a weight is materialised (see LazyWeight)."""
    pp, tp = len(shards), len(shards[0])

    def col(name: str, stage: int) -> list[torch.Tensor]:  # column-parallel: output dim split
        return [shards[stage][r][name] for r in range(tp)]

    def row(hf_name: str, name: str, stage: int) -> LazyWeight:  # row-parallel: input dim split
        return LazyWeight(hf_name, tuple(shards[stage][r][name] for r in range(tp)), dim=1)

    yield LazyWeight("model.embed_tokens.weight", _first_rows(col("embedding.word_embeddings.weight", 0), s.vocab_size))
    for stage in range(pp):
        for local, layer in enumerate(_stage_layers(s, stage, pp)):
            h, m = f"model.layers.{layer}.", f"decoder.layers.{local}."
            a = h + "self_attn."
            first = shards[stage][0]
            yield LazyWeight(h + "input_layernorm.weight", (first[m + "input_layernorm.weight"],))
            for kind in ("weight", "bias") if s.qkv_bias else ("weight",):
                # each TP shard is the interleaved layout of its own query groups
                parts = [_split_qkv(x, _shard_shape(s, tp)) for x in col(m + "self_attention.linear_qkv." + kind, stage)]
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    yield LazyWeight(f"{a}{name}.{kind}", tuple(v for p in parts for v in p[i]))
            yield row(a + "o_proj.weight", m + "self_attention.linear_proj.weight", stage)
            yield LazyWeight(h + "post_attention_layernorm.weight", (first[m + "pre_mlp_layernorm.weight"],))
            fc1 = [x.chunk(2, dim=0) for x in col(m + "mlp.linear_fc1.weight", stage)]  # [gate_r; up_r] per rank
            yield LazyWeight(h + "mlp.gate_proj.weight", tuple(g for g, _ in fc1))
            yield LazyWeight(h + "mlp.up_proj.weight", tuple(u for _, u in fc1))
            yield row(h + "mlp.down_proj.weight", m + "mlp.linear_fc2.weight", stage)
    yield LazyWeight("model.norm.weight", (shards[pp - 1][0]["decoder.final_layernorm.weight"],))
    if not s.tied_embeddings:
        yield LazyWeight("lm_head.weight", _first_rows(col("output_layer.weight", pp - 1), s.vocab_size))


def megatron_to_hf(shards: list[list[Mapping[str, torch.Tensor]]], s: ModelShape) -> dict[str, torch.Tensor]:
    """The HF state dict from all shards, `shards[pp_rank][tp_rank]` (new tensors, sharing nothing)."""
    return {w.name: w.materialize(torch.empty(w.shape, dtype=w.dtype)) for w in megatron_to_hf_lazy(shards, s)}


def _shard_shape(s: ModelShape, tp: int) -> ModelShape:
    """The head counts one TP rank holds (its qkv shard is laid out like a model with these)."""
    return ModelShape(s.num_layers, s.hidden_size // tp, s.num_heads // tp, s.num_kv_heads // tp,
                      s.ffn_hidden_size // tp, s.vocab_size, s.qkv_bias, s.tied_embeddings)


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


def lazy_hf_weights(model_dir: str | Path) -> LazyHFWeights:
    return LazyHFWeights(model_dir)
