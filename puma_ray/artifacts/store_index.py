"""Rows of a prompt store by user, without reading the store whole: the lean driver's and the Ray actors' access.

`StoreIndex(store)` reads only the user_id column of every shard (user → shard), refusing a user listed twice or
a count other than the manifest's, as `PromptStore.read_all` does; `rows(users)` then reads just the shards those
users sit in (each read verified against the manifest) and keeps the last `shards_kept` of them, so a caller that
asks for the users of one block at a time holds a few shards, never the store.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pandas as pd

from puma_ray.artifacts.store import PromptStore, StoreError

SHARDS_KEPT = 4  # shards kept read: a block's users mostly sit in a few of them (stores are written in id order)


def sorted_positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each of `ids` in the sorted, unique `sorted_ids`; -1 where it is not there (no hash table, no
    sorted copy: the lean driver's id lookups at millions of users)."""
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)


def sorted_member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each of `ids` is in the sorted, unique `sorted_ids`."""
    return sorted_positions(sorted_ids, ids) >= 0


class StoreIndex:
    def __init__(self, store: PromptStore, shards_kept: int = SHARDS_KEPT):
        self.store, self.shards_kept = store, shards_kept
        ids, shard_of = [], []
        for k, entry in enumerate(store.manifest.shards):
            shard_ids = store.read_user_ids(entry).astype(str)
            ids.append(shard_ids)
            shard_of.append(np.full(len(shard_ids), k, np.int32))
        all_ids = np.concatenate(ids) if ids else np.array([], dtype=str)
        # sorted fixed-width ids + searchsorted, no hash table of Python strings: ~4 bytes a character a user
        self._ids = all_ids
        self._shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        if not (all_ids[1:] > all_ids[:-1]).all():  # stores are written in id order: then no sorted copy is made
            order = np.argsort(all_ids, kind="stable")
            self._ids, self._shard_of = all_ids[order], self._shard_of[order]
        del all_ids
        dup = self._ids[1:][self._ids[1:] == self._ids[:-1]]
        if len(dup):
            raise StoreError(f"store {store.path}: user {str(dup[0])!r} appears more than once")
        if len(self._ids) != store.manifest.num_users:
            raise StoreError(f"store {store.path}: {len(self._ids)} users in shards, manifest says "
                             f"{store.manifest.num_users}")
        self._read: OrderedDict[int, tuple[pd.Index, np.ndarray]] = OrderedDict()

    @property
    def users(self) -> np.ndarray:
        """Every user of the store, sorted (str)."""
        return self._ids

    def _positions(self, users: np.ndarray) -> np.ndarray:
        """Index into the sorted ids of each user, -1 when the store does not hold it."""
        return sorted_positions(self._ids, users)

    def has(self, users: np.ndarray) -> np.ndarray:
        return self._positions(np.asarray(users, dtype=str)) >= 0

    def _shard(self, k: int) -> tuple[pd.Index, np.ndarray]:
        if k not in self._read:
            ids, prompts = self.store.read_shard(self.store.manifest.shards[k])
            self._read[k] = (pd.Index(ids.astype(str)), prompts)
            if len(self._read) > self.shards_kept:
                self._read.popitem(last=False)
        self._read.move_to_end(k)
        return self._read[k]

    def rows(self, users: np.ndarray) -> np.ndarray:
        """(len(users), l, d) float32, in the order of `users`; a user without a prompt is a StoreError."""
        users = np.asarray(users, dtype=str)
        pos = self._positions(users)
        if (pos < 0).any():
            raise StoreError(f"store {self.store.path}: user {str(users[pos < 0][0])!r} has no prompt "
                             f"({int((pos < 0).sum())} user(s) in all)")
        out = np.empty((len(users), *self.store.prompt_shape), np.float32)
        shards = self._shard_of[pos]
        for k in np.unique(shards):
            at = np.flatnonzero(shards == k)
            ids, prompts = self._shard(int(k))
            out[at] = prompts[ids.get_indexer(users[at])]
        return out
