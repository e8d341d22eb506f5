"""One pass over a store's shards on an actor pool: every user seen exactly once, the driver receiving rows of (id,
cluster labels, sums of squares), never the prompt matrix. selection.strategies.kmeans_labels' two steps split
across it: the fit on a sample in the driver (lean_clusters, lean_ffn_clusters), the assignment of everyone on the
actors (shard_pass), giving the labels the in-process K-means gives."""
from __future__ import annotations

import numpy as np
import ray

from puma_ray.artifacts.store import PromptStore, StoreError, typical_rms
from puma_ray.artifacts.store_index import StoreIndex, sorted_positions
from puma_ray.config import TemplateConfig
from puma_ray.fs import StorageOptions
from puma_ray.models.backbone import load_model
from puma_ray.selection.statistics import ffn_features
from puma_ray.selection.strategies import kmeans_labels, kmeans_sample_rows, sampled_kmeans

from .compat import actor_pool, actor_retries


class ShardPass:
    """Per shard of the first source store: its users, their K-means labels (-1 without a model), the K-means
    labels of their FFN features (when `ffn` holds the source model and a fitted K-means) and each source's sum of
    squares over the user's prompt (the prompt scale the adapter is built with), one row per user."""

    def __init__(self, paths: list[str], model, storage: StorageOptions | None, ffn: dict | None = None):
        self.stores = [PromptStore.open(p, storage) for p in paths]
        self.others = [StoreIndex(s) for s in self.stores[1:]]
        self.model, self.ffn = model, ffn
        if ffn is not None:  # the source model, as the driver's statistics.ffn_features runs it
            self.plm = source_plm(ffn["model"], self.stores[0])

    def __call__(self, batch: dict) -> dict:
        ids, first = self.stores[0].read_shard(self.stores[0].manifest.shards[int(batch["shard"][0])])
        # a user some other source lacks is dropped by the missing-user policy in the driver: zeros here
        prompts = [first, *(self._aligned(ix, ids) for ix in self.others)]
        flat = np.concatenate([p.reshape(len(p), -1) for p in prompts], axis=1)
        labels = self.model.predict(flat) if self.model is not None else np.full(len(ids), -1)
        ffn_labels = np.full(len(ids), -1)
        if self.ffn is not None:
            ffn_labels = self.ffn["kmeans"].predict(ffn_features(self.plm, first)[0])
        return {"user_id": ids.astype(str), "label": np.asarray(labels, np.int32),
                "ffn_label": np.asarray(ffn_labels, np.int32),
                "sumsq": np.stack([np.square(p, dtype=np.float64).reshape(len(p), -1).sum(1) for p in prompts], 1)}

    @staticmethod
    def _aligned(index: StoreIndex, ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(ids), *index.store.prompt_shape), np.float32)
        have = index.has(ids)
        out[have] = index.rows(ids[have])
        return out


def source_plm(model, store: PromptStore):
    from puma_ray.models.prompted_lm import PromptedLM
    backbone = load_model(model)
    store.check_model(backbone.identity)
    return PromptedLM(backbone, TemplateConfig(**store.manifest.template), store.manifest.prompt_length, {}, 0)


def shard_pass(stores: list[PromptStore], users: np.ndarray, model, storage, actors: int, cpus_per_actor: float,
               ffn: dict | None = None):
    """(prompt K-means labels aligned with the sorted `users` (-1 without a model), FFN K-means labels (-1 without
    `ffn`), prompt RMS per source over them); every user is seen exactly once. The driver receives rows of (id,
    labels, sums), batch by batch."""
    items = ray.data.from_items([{"shard": k} for k in range(len(stores[0].manifest.shards))])
    parts = items.map_batches(ShardPass, batch_size=1, batch_format="numpy",
                              fn_constructor_kwargs={"paths": [s.path for s in stores], "model": model,
                                                     "storage": storage, "ffn": ffn},
                              num_cpus=cpus_per_actor, **actor_pool(min(actors, len(stores[0].manifest.shards))),
                              **actor_retries())
    labels, ffn_labels = np.full(len(users), -2, np.int32), np.full(len(users), -2, np.int32)
    seen = np.zeros(len(users), np.int64)
    sumsq = np.zeros((len(users), len(stores)))
    for batch in parts.iter_batches(batch_size=65_536, batch_format="numpy"):
        pos = sorted_positions(users, batch["user_id"].astype(str))
        kept = pos >= 0  # not kept: dropped by the missing-user policy
        labels[pos[kept]] = batch["label"][kept]
        ffn_labels[pos[kept]] = batch["ffn_label"][kept]
        np.add.at(seen, pos[kept], 1)
        sumsq[pos[kept]] = np.asarray(batch["sumsq"], np.float64)[kept]
    if (seen != 1).any():  # a user in no shard or in two: the store changed since it was indexed
        bad = int(np.flatnonzero(seen != 1)[0])
        raise StoreError(f"store {stores[0].path}: user {str(users[bad])!r} read {int(seen[bad])} times in its shards")
    values = [s.manifest.prompt_length * s.manifest.hidden_size for s in stores]
    return labels, ffn_labels, [typical_rms(np.sqrt(sumsq[:, i] / v)) or 1.0 for i, v in enumerate(values)]


def lean_ffn_clusters(plm, index: StoreIndex, users: np.ndarray, k: int, seed: int, sample: int):
    """The FFN-feature clusters by kmeans_labels' two steps, as lean_clusters does for the prompts: features of at
    most `sample` users computed and clustered in the driver, the rest featurised and assigned on the actors."""
    rows = kmeans_sample_rows(len(users), seed, sample)
    picked = users if rows is None else users[rows]
    features = ffn_features(plm, index.rows(picked))[0]
    if rows is None:
        return kmeans_labels(features, k, seed, sample), None
    return None, sampled_kmeans(features, k, seed)


def lean_clusters(indexes: list[StoreIndex], users: np.ndarray, k: int, seed: int, sample: int):
    """kmeans_labels' two steps: the fit in the driver on at most `sample` users' prompts, the assignment of the
    rest on the cluster (None: the shard pass assigns nothing, the driver already has every label)."""
    rows = kmeans_sample_rows(len(users), seed, sample)
    picked = users if rows is None else users[rows]
    x = np.concatenate([ix.rows(picked).reshape(len(picked), -1) for ix in indexes], axis=1)
    if rows is None:  # a small population: plain K-means on all of it, as in-process
        return kmeans_labels(x, k, seed, sample), None
    return None, sampled_kmeans(x, k, seed)
