"""Keys and values of a template's fixed prefix, computed once and reused by every record that shares it.

Everything before a record's first prompt slot depends on no trainable parameter: the paper's wording puts only
the question there (one prefix for all records), an item-first wording puts the item text there too (one prefix per
item), a CTR template with the click history before the slot has one prefix per history. Its keys and values are
computed once per process, stored per prefix (its token ids are the key) under a byte bound, and a batch then runs
only the prompt slots and what follows them, forward and backward.

Layout of a cached batch: the prefix KVs of the rows, left padded to the longest prefix in the batch, then each
row's suffix (slots + the rest) right padded. Positions continue each row's own prefix length, and the distance
between any two real tokens equals the uncached layout's, so RoPE and sliding windows see exactly what the full
sequence sees; the answer is read at each row's last real token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# the default bound: the paper's wording needs a few KB; an item-first template on 1,682 items of a 2-layer
# foundation ~60 MB; SmolLM2-135M item-first (30 layers x ~50 positions x 384 floats) ~2 GB in float32 for all
# items, so a CPU run keeps the first-seen ~1 GB and computes the rest on the fly
DEFAULT_PREFIX_CACHE_MIB = 1024

Prefix = tuple[int, ...]
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape (kv_heads, positions, head_dim)


def cache_argument(model: torch.nn.Module) -> str:
    """The forward argument that takes a KV cache: `cache` since transformers 5.2x, `past_key_values` before (and
    deprecated after): the one place that knows."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


@dataclass
class PrefixCacheStats:
    prefixes: int = 0  # stored
    positions: int = 0  # stored prefixes' positions, summed
    bytes: int = 0  # stored keys + values
    positions_built: int = 0  # prefix positions computed, stored or not (FLOPs: these and the suffixes)
    built_on_the_fly: int = 0  # prefixes computed for one batch because the bound was reached
    build_s: float = 0.0
    layers: int = 0
    kv_width: int = 0  # floats per position and layer, keys + values

    def describe(self) -> str:
        return (f"prefix cache: {self.prefixes:,} prefixes ({self.positions:,} positions) x {self.layers} layers x "
                f"{self.kv_width} kv values = {self.bytes / 2 ** 20:.1f} MiB, built in {self.build_s:.1f}s"
                + (f", {self.built_on_the_fly:,} computed on the fly (bound reached)" if self.built_on_the_fly else ""))


class PrefixCache:
    """Bounded store of prefix KVs for one frozen model. A prefix seen when the bound is reached is computed for
    its batch and not stored (no eviction: a random batch order would make an LRU thrash)."""

    def __init__(self, model: torch.nn.Module, max_bytes: int):
        self.model, self.max_bytes = model, max_bytes
        self._store: dict[Prefix, KV] = {}
        self.argument = cache_argument(model)
        self.stats = PrefixCacheStats()

    @torch.no_grad()
    def _compute(self, prefixes: list[Prefix]) -> list[KV]:
        """KVs of prefixes of one length, in one forward: no padding, positions from 0."""
        from transformers import DynamicCache
        device = self.model.get_input_embeddings().weight.device
        ids = torch.tensor(prefixes, dtype=torch.long, device=device)
        cache = DynamicCache()  # plain layers: every position kept, also for sliding-window layers
        self.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), **{self.argument: cache},
                              use_cache=True, position_ids=torch.arange(ids.shape[1], device=device).expand_as(ids))
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.stats.layers = len(layers)
        self.stats.kv_width = int(layers[0][0].shape[1] * layers[0][0].shape[3] * 2)
        return [[(k[row], v[row]) for k, v in layers] for row in range(len(prefixes))]

    def lookup(self, prefixes: list[Prefix]) -> dict[Prefix, KV]:
        """KV of every distinct prefix of a batch: stored ones, the rest computed (and stored while under bound)."""
        found = {p: self._store[p] for p in set(prefixes) if p in self._store}
        missing = sorted(set(prefixes) - set(found))
        if not missing:
            return found
        start = time.perf_counter()
        by_length: dict[int, list[Prefix]] = {}
        for p in missing:
            by_length.setdefault(len(p), []).append(p)
        for group in by_length.values():
            for p, kv in zip(group, self._compute(group)):
                found[p] = kv
                self.stats.positions_built += len(p)
                size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
                if self.stats.bytes + size <= self.max_bytes:
                    # clone: a row view would keep the whole batch's tensor alive
                    self._store[p] = [(k.clone(), v.clone()) for k, v in kv]
                    self.stats.bytes += size
                    self.stats.prefixes += 1
                    self.stats.positions += len(p)
                else:
                    self.stats.built_on_the_fly += 1
        self.stats.build_s += time.perf_counter() - start
        return found


def batch_prefix(kvs: list[KV]) -> tuple[KV, torch.Tensor]:
    """Each row's prefix KV left padded to the longest: per layer (keys, values) of shape (B, heads, P, head_dim),
    and the (B, P) mask of the real prefix positions."""
    longest = max(kv[0][0].shape[1] for kv in kvs)
    first = kvs[0]
    mask = torch.zeros(len(kvs), longest, dtype=torch.long, device=first[0][0].device)
    for row, kv in enumerate(kvs):
        mask[row, longest - kv[0][0].shape[1]:] = 1
    layers, shared = [], all(kv is first for kv in kvs)
    for layer, (k0, v0) in enumerate(first):
        if shared:  # one prefix for the whole batch (the paper's wording): a view, no copy
            keys, values = k0.unsqueeze(0).expand(len(kvs), -1, -1, -1), v0.unsqueeze(0).expand(len(kvs), -1, -1, -1)
        else:
            keys = k0.new_zeros(len(kvs), k0.shape[0], longest, k0.shape[2])
            values = v0.new_zeros(len(kvs), v0.shape[0], longest, v0.shape[2])
            for row, kv in enumerate(kvs):
                n = kv[layer][0].shape[1]
                keys[row, :, longest - n:] = kv[layer][0]
                values[row, :, longest - n:] = kv[layer][1]
        layers.append((keys, values))
    return layers, mask


def fresh_cache(model: torch.nn.Module, layers: KV):
    """A new HF cache holding a batch's prefix: built per forward, since a forward appends its own positions to
    it (a batch may run twice: evaluation of two prompt sets, a retried step)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)  # the model's own layer kinds: sliding windows crop as in generation
    for layer, (keys, values) in enumerate(layers):
        cache.update(keys, values, layer)
    return cache
