"""A KV cache whose prompt part is held once per prompt, not once per sample (broad rollouts, BroRL).

The torch engine prefills each prompt of a chunk once; its n samples then decode from that prompt's keys and
values. Copying them into every sample's row (DynamicCache.batch_select_indices) makes the cache hold
rows x (P + t) positions per layer, so memory grows with n x prompt length: with BroRL's n = 512 the prompt
copies dominate. A SharedPrefixLayer holds the prompt's keys and values once ([prompts, heads, P, dim]) and
each row's generated suffix ([rows, heads, t, dim]); at every decode step it hands attention the full
[rows, heads, P + t, dim] tensors, built transiently (an index_select of the prompt part, concatenated with
the suffix) and freed with the layer's attention output. Attention sees the very tensors (same values, same
shapes, contiguous) the copying cache gave it, so the sampled tokens and logprobs stay bit-identical; what
is held per layer falls from rows x (P + t) to prompts x P + rows x t, at the price of one layer's transient
copy per step (cascade attention would avoid even that, but changes the reduction order, so the bits)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SharedPrefixLayer(DynamicLayer):
    """One attention layer's cache: the prompts' keys/values once, each row's suffix, `row_of[r]` = row r's
    prompt. `keys`/`values` stay None: nothing reads them for a dynamic cache but the layer itself (what
    would, offloading, reordering, cropping, the legacy tuple format, is refused, never wrong)."""

    is_croppable = False

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, row_of: torch.Tensor,
                 suffix_keys: torch.Tensor, suffix_values: torch.Tensor) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.suffix_keys, self.suffix_values = suffix_keys, suffix_values
        self.row_of = row_of
        self.device = prefix_keys.device
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.suffix_keys = torch.cat([self.suffix_keys, key_states], dim=-2)
        self.suffix_values = torch.cat([self.suffix_values, value_states], dim=-2)
        # Transient: the caller's attention holds these until the layer's output is computed, no longer.
        keys = torch.cat([self.prefix_keys.index_select(0, self.row_of), self.suffix_keys], dim=-2)
        values = torch.cat([self.prefix_values.index_select(0, self.row_of), self.suffix_values], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.suffix_keys.shape[-2]

    def reset(self) -> None:
        self.prefix_keys = self.prefix_values = self.suffix_keys = self.suffix_values = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prefix cache is never cropped (the torch engine does not)")

    def offload(self) -> None:
        raise NotImplementedError("a shared-prefix cache is never offloaded (the torch engine does not)")

    def prefetch(self) -> None:
        raise NotImplementedError("a shared-prefix cache is never offloaded (the torch engine does not)")

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        raise NotImplementedError("a shared-prefix cache keeps its rows' prompts in row_of")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a shared-prefix cache keeps its rows' prompts in row_of")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a shared-prefix cache keeps its rows' prompts in row_of")


def share_prompts(cache: DynamicCache, row_of: torch.Tensor) -> DynamicCache:
    """`cache`, a prefill of one row per prompt, as the cache of rows whose prompt is `row_of` (in place).
    Layers of another kind (sliding windows) are copied to every row, as before."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            k, v = layer.keys, layer.values
            cache.layers[i] = SharedPrefixLayer(k, v, row_of, k.new_empty((len(row_of), k.shape[1], 0, k.shape[3])),
                                                v.new_empty((len(row_of), v.shape[1], 0, v.shape[3])))
        else:
            layer.batch_select_indices(row_of)
    return cache


def reshare_rows(cache: DynamicCache, row_of: torch.Tensor, prompt_len: int) -> DynamicCache:
    """A rebuilt cache (a prefill over every row's prompt + response, after a weight update) with its prompt
    columns held once per prompt again, layer by layer where every row's prompt columns equal its prompt's
    first row's bit for bit (they are computed from the same tokens; a layer where a kernel made them differ
    keeps its own rows, so the numerics never change)."""
    first = torch.zeros(int(row_of.max()) + 1, dtype=torch.long, device=row_of.device)
    first.scatter_reduce_(0, row_of, torch.arange(len(row_of), device=row_of.device), "amin", include_self=False)
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            continue
        pk, pv = layer.keys[first, :, :prompt_len], layer.values[first, :, :prompt_len]
        if torch.equal(pk.index_select(0, row_of), layer.keys[:, :, :prompt_len]) and torch.equal(
                pv.index_select(0, row_of), layer.values[:, :, :prompt_len]):
            cache.layers[i] = SharedPrefixLayer(pk, pv, row_of, layer.keys[:, :, prompt_len:].contiguous(),
                                                layer.values[:, :, prompt_len:].contiguous())
    return cache


def held_bytes(cache: DynamicCache) -> int:
    """Bytes of the key/value tensors `cache` holds (not the transient ones a decode step builds)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, SharedPrefixLayer):
            parts = (layer.prefix_keys, layer.prefix_values, layer.suffix_keys, layer.suffix_values)
        else:
            parts = (getattr(layer, "keys", None), getattr(layer, "values", None))
        total += sum(p.numel() * p.element_size() for p in parts if p is not None)
    return total
