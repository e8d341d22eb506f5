"""User selection (the paper's Table 4): pure functions of (features, budget, K, seed), registered by name.

Every strategy returns exactly `budget` distinct row indices, deterministically for a seed, with no random filler:
what a small bin or cluster cannot supply is redistributed to the others by `allocate`. An impossible budget or K
is an error. PUMA = "kmeans_variance": K-means on the source prompts, then within each cluster quantile bins of
per-user label variance: every bin represented (the whole spectrum), the rest by normal weights favouring the
middle (`binned_quota`, the one rule of every binning strategy).

At scale (1M users x d=2048) the prompt matrix itself is the cost (8 GB fp32): K-means is fitted by mini-batch
K-means on a sample of at most `kmeans_sample` users and every user is then assigned in chunks; variance and loss
are per-user scalars. See `SelectionInput` and `select`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA

from puma_ray.config import ConfigError
from puma_ray.errors import SelectionError
from puma_ray.selection.fence import FencedModel, RowFence, fence_rows


@dataclass
class SelectionInput:
    """Per-user features, rows aligned with `user_ids`."""
    user_ids: np.ndarray
    # (n, l*d) source prompts (concatenated across sources for aggregated migration); None when only `clusters`
    # is known (a lean driver: K-means fitted on a sample, every user assigned on the cluster)
    prompts: np.ndarray | None
    variance: np.ndarray | None = None  # sample variance (ddof=1) of the user's training labels
    loss: np.ndarray | None = None  # the source model's mean task loss on the user's training records
    ffn: np.ndarray | None = None  # binarised, L2-normalised FFN activations of [BOS, p_u] (last 3 layers)
    options: dict = field(default_factory=dict)  # kmeans_sample, pca_components, variance_bins, ...
    # K-means labels of `prompts` for this K and seed, computed by `kmeans_labels`' algorithm elsewhere (the Ray
    # layer assigns each store shard on the cluster): strategies use them instead of clustering the prompts again
    clusters: np.ndarray | None = None
    ffn_clusters: np.ndarray | None = None  # the same for the `ffn` features

    def __len__(self) -> int:
        return len(self.user_ids)

    def need(self, name: str) -> np.ndarray:
        value = getattr(self, name)
        if value is None:
            raise SelectionError(f"this strategy needs per-user {name!r}, which was not computed")
        return value


Strategy = Callable[[SelectionInput, int, int, int], np.ndarray]
STRATEGIES: dict[str, Strategy] = {}
NEEDS: dict[str, tuple[str, ...]] = {}  # which per-user statistics each strategy reads (so callers compute only those)


def register(name: str, needs: tuple[str, ...] = ()):
    def wrap(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        NEEDS[name] = needs
        return fn
    return wrap


def select(name: str, inputs: SelectionInput, budget: int, k: int = 15, seed: int = 0) -> np.ndarray:
    """Sorted indices of exactly `budget` distinct users chosen by strategy `name`."""
    if name not in STRATEGIES:
        raise SelectionError(f"unknown selection strategy {name!r}; known: {sorted(STRATEGIES)}")
    n = len(inputs)
    if not 1 <= budget <= n:
        raise SelectionError(f"budget {budget} is impossible with {n} users (need 1 <= budget <= users)")
    if k < 1 or k > n:
        raise SelectionError(f"K={k} clusters is impossible with {n} users")
    chosen = np.asarray(STRATEGIES[name](inputs, budget, k, seed), dtype=np.int64)
    if len(chosen) != budget or len(np.unique(chosen)) != budget or chosen.min() < 0 or chosen.max() >= n:
        raise AssertionError(f"strategy {name} returned {len(chosen)} users ({len(np.unique(chosen))} distinct) "
                             f"for budget {budget}")  # a bug in a strategy, never a user error
    return np.sort(chosen)


def resolve_budget(budget: float | int, n_users: int, field: str = "selection.budget") -> int:
    """An int is a user count; a float in (0, 1) a fraction of the users. `field` names the setting in errors."""
    import numbers
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool):
        raise ConfigError(f"{field} {budget!r}: give a user count (>= 1) or a fraction in (0, 1)")
    if 0 < budget < 1:
        return max(1, int(round(budget * n_users)))
    if budget >= 1 and float(budget).is_integer():
        return int(budget)
    raise ConfigError(f"{field} {budget!r}: give a user count (>= 1) or a fraction in (0, 1)")


def check_selection(budget: float | int, valid_users: float | int, n_users: int) -> None:
    """Budget and validation users against the users there are: checked as soon as the data is read, before
    any store is trained (an impossible budget used to surface after the source store's training)."""
    chosen = resolve_budget(budget, n_users)
    if chosen > n_users:
        raise ConfigError(f"selection.budget {budget!r} asks for {chosen} users; the data has {n_users}")
    held_out = resolve_budget(valid_users, n_users, "selection.valid_users")
    if chosen < n_users and held_out > n_users - chosen:
        raise ConfigError(f"selection.valid_users {valid_users!r} asks for {held_out} users; only {n_users - chosen}"
                          f" are left after selection.budget's {chosen}")


# ---- building blocks -----------------------------------------------------------------------------------------
def allocate(total: int, capacity: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, each <= capacity, proportional to weight; what a full group cannot take
    goes to the others by weight (largest remainder, ties to the lower index: deterministic)."""
    capacity = np.asarray(capacity, dtype=np.int64)
    weight = np.where(capacity > 0, np.asarray(weight, dtype=np.float64), 0.0)
    if total > capacity.sum():
        raise SelectionError(f"cannot take {total} from groups holding {capacity.sum()}")
    counts = np.zeros_like(capacity)
    while counts.sum() < total:
        open_ = counts < capacity
        w = np.where(open_, weight, 0.0)
        if w.sum() <= 0:  # only zero-weight groups left: spread evenly over those with room
            w = open_.astype(np.float64)
        remaining = total - counts.sum()
        share = w / w.sum() * remaining
        add = np.floor(share).astype(np.int64)
        # largest remainder of this round's shares, ties to the lower index; only groups with room qualify
        order = np.lexsort((np.arange(len(share)), -(share - np.floor(share))))
        for i in [i for i in order if open_[i]][: remaining - add.sum()]:
            add[i] += 1
        counts += np.minimum(add, capacity - counts)  # what a full group cannot take goes round again
    return counts


def normal_weights(n_bins: int, span: float, floor: float = 0.0) -> np.ndarray:
    """exp(-x^2/2) + floor over x = linspace(-span, span, n): favours the middle bins (the paper's weighting)."""
    x = np.linspace(-span, span, n_bins)
    w = np.exp(-x ** 2 / 2) + floor
    return w / w.sum()


def spread_positions(groups: np.ndarray, count: int) -> np.ndarray:
    """`count` of the given group indices (sorted), evenly spaced from the first to the last: both ends when
    count >= 2, the middle one when count == 1."""
    if count >= len(groups):
        return groups
    if count == 1:
        return groups[[len(groups) // 2]]
    return groups[np.round(np.linspace(0, len(groups) - 1, count)).astype(np.int64)]


# The one rule every strategy that bins users by a statistic (variance, loss) shares: the paper's subset "spans
# the whole spectrum" while "weighting the medium groups more heavily". Weights alone cannot do both at a few
# users a cluster: normal weights over 5 bins are [.05 .24 .40 .24 .05], and 6 users by largest remainder are
# [0 2 2 2 0], so the extreme quintiles were never chosen (4-7 of 94 users over seeds 0-2, random picks ~38).
BIN_RULES = ("spectrum", "weights")


def binned_quota(quota: int, capacity: np.ndarray, weights: np.ndarray, rule: str = "spectrum") -> np.ndarray:
    """Users to take from each (ordered) bin. "spectrum" (the paper's rule, the default): first one user from
    each non-empty bin, or, when the quota is smaller than the bins, from bins evenly spread over the range (both
    ends included); the rest by the medium-favouring `weights`. "weights": by the weights alone (the rule before
    the review; kept to show the difference in Table 4)."""
    capacity = np.asarray(capacity, np.int64)
    if rule not in BIN_RULES:
        raise SelectionError(f"unknown bin rule {rule!r}; known: {list(BIN_RULES)}")
    if rule == "weights":
        return allocate(quota, capacity, weights)
    base = np.zeros_like(capacity)
    base[spread_positions(np.flatnonzero(capacity > 0), quota)] = 1
    return base + allocate(quota - int(base.sum()), capacity - base, weights)


def quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index 0..n_bins-1 per value by rank (ties broken by position): equal-count bins even with ties."""
    n = len(values)
    if n == 0:
        return np.zeros(0, np.int64)
    # rounded first: a variance summed by Ray Data's streaming Std and by pandas differ in the last bits, and
    # equal values must rank by position whichever engine computed them
    rank = np.argsort(np.argsort(np.round(np.asarray(values, np.float64), 9), kind="stable"), kind="stable")
    return np.minimum(rank * n_bins // max(n, 1), n_bins - 1)


def sample_groups(groups: np.ndarray, quota: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """quota[g] users drawn uniformly without replacement from each group g."""
    out = []
    for g, q in enumerate(quota):
        if q:
            members = np.flatnonzero(groups == g)
            out.append(rng.choice(members, size=int(q), replace=False))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def kmeans_sample_rows(n: int, seed: int, sample: int = 100_000) -> np.ndarray | None:
    """The rows mini-batch K-means is fitted on above `sample` users (sorted); None: all rows, plain K-means."""
    if n <= sample:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))


def sampled_kmeans(x_sample: np.ndarray, k: int, seed: int) -> FencedModel:
    """The model fitted on the rows kmeans_sample_rows named (outliers beyond the fence left out); `.predict` then
    assigns any chunk of users, outliers clipped onto the fence."""
    x_sample = np.asarray(x_sample, dtype=np.float32)
    fence = RowFence.fit(x_sample)
    inliers = fence.inliers(x_sample)
    fit_rows = x_sample[inliers] if inliers.sum() >= k else x_sample
    return FencedModel(fence, MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3).fit(fit_rows))


def kmeans_labels(x: np.ndarray, k: int, seed: int, sample: int = 100_000) -> np.ndarray:
    """K-means (k-means++) labels for every row; above `sample` rows, mini-batch K-means fitted on a sample and
    every row assigned in chunks, so memory stays at the sample plus one chunk of distances. The Ray layer runs
    the same two steps with the assignment on the cluster (same labels)."""
    x = np.asarray(x, dtype=np.float32)
    rows = kmeans_sample_rows(len(x), seed, sample)
    if rows is None:
        fence = RowFence.fit(x)
        inliers = fence.inliers(x)
        if inliers.all() or inliers.sum() < k:
            return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
        # the outliers do not move the centres; each still gets the cluster nearest its clipped row
        return KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x[inliers]).predict(fence.apply(x))
    model = sampled_kmeans(x[rows], k, seed)
    return np.concatenate([model.predict(x[i:i + 65_536]) for i in range(0, len(x), 65_536)])


def stratified_within(clusters: np.ndarray, budget: int, k: int, rng: np.random.Generator,
                      pick: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """Budget split over clusters in proportion to size (at least one per cluster when the budget allows), then
    `pick(member_indices, quota)` chooses inside each cluster."""
    sizes = np.bincount(clusters, minlength=k)
    base = np.zeros(k, np.int64)
    if budget >= int((sizes > 0).sum()):
        base = (sizes > 0).astype(np.int64)  # every preference profile represented
    quota = base + allocate(budget - base.sum(), sizes - base, sizes.astype(np.float64))
    out = [pick(np.flatnonzero(clusters == c), int(q)) for c, q in enumerate(quota) if q]
    return np.concatenate(out)


def _binned_pick(values: np.ndarray, n_bins: int, span: float, rng: np.random.Generator, rule: str):
    weights = normal_weights(n_bins, span)

    def pick(members: np.ndarray, quota: int) -> np.ndarray:
        bins = quantile_bins(values[members], n_bins)
        counts = binned_quota(quota, np.bincount(bins, minlength=n_bins), weights, rule)
        return members[sample_groups(bins, counts, rng)]
    return pick


def _uniform_pick(rng: np.random.Generator):
    return lambda members, quota: rng.choice(members, size=quota, replace=False)


def _farthest_point_pick(x: np.ndarray):
    def pick(members: np.ndarray, quota: int) -> np.ndarray:
        pts = x[members]
        first = int(np.argmin(((pts - pts.mean(0)) ** 2).sum(1)))  # start at the medoid-ish point: deterministic
        chosen = [first]
        dist = ((pts - pts[first]) ** 2).sum(1)
        dist[first] = -1.0  # chosen points stay at -1 (np.minimum keeps it): never re-picked, even among duplicates
        for _ in range(quota - 1):
            nxt = int(np.argmax(dist))
            chosen.append(nxt)
            dist = np.minimum(dist, ((pts - pts[nxt]) ** 2).sum(1))
            dist[nxt] = -1.0
        return members[np.array(chosen)]
    return pick


def _opt(inputs: SelectionInput, key: str, default):
    return inputs.options.get(key, default)


def _bin_rule(inputs: SelectionInput) -> str:
    return _opt(inputs, "bin_rule", "spectrum")


# ---- the strategies of Table 4 ------------------------------------------------------------------------------
@register("random")
def random_users(inputs, budget, k, seed):
    return np.random.default_rng(seed).choice(len(inputs), size=budget, replace=False)


def _bucketing(values, budget, seed, n_bins, rule):
    """Global quantile bins, normal weights over linspace(-3, 3) + 0.1 (the original's variance bucketing), the
    shared bin rule (binned_quota) on top."""
    bins = quantile_bins(values, n_bins)
    counts = binned_quota(budget, np.bincount(bins, minlength=n_bins), normal_weights(n_bins, 3.0, floor=0.1), rule)
    return sample_groups(bins, counts, np.random.default_rng(seed))


@register("variance_bucketing", needs=("variance",))
def variance_bucketing(inputs, budget, k, seed):
    return _bucketing(inputs.need("variance"), budget, seed, _opt(inputs, "global_bins", 8), _bin_rule(inputs))


@register("loss_bucketing", needs=("loss",))
def loss_bucketing(inputs, budget, k, seed):
    return _bucketing(inputs.need("loss"), budget, seed, _opt(inputs, "global_bins", 8), _bin_rule(inputs))


def _clusters(x, k, seed, inputs):
    return kmeans_labels(x, k, seed, _opt(inputs, "kmeans_sample", 100_000))


def _precomputed_or(labels, feature: str, inputs, k, seed):
    if labels is not None:
        if len(labels) != len(inputs) or labels.max(initial=0) >= k:
            raise SelectionError(f"precomputed {feature} clusters do not fit {len(inputs)} users and K={k}")
        return labels
    return _clusters(inputs.need(feature), k, seed, inputs)


def _prompt_clusters(inputs, k, seed):
    """K-means labels of the source prompts: the precomputed ones when given, else computed here."""
    return _precomputed_or(inputs.clusters, "prompts", inputs, k, seed)


def _ffn_clusters(inputs, k, seed):
    return _precomputed_or(inputs.ffn_clusters, "ffn", inputs, k, seed)


@register("kmeans_stratified")
def kmeans_stratified(inputs, budget, k, seed):
    rng = np.random.default_rng(seed)
    return stratified_within(_prompt_clusters(inputs, k, seed), budget, k, rng, _uniform_pick(rng))


@register("kmeans_pca")
def kmeans_pca(inputs, budget, k, seed):
    rng = np.random.default_rng(seed)
    prompts = inputs.need("prompts")
    n_comp = min(_opt(inputs, "pca_components", 32), prompts.shape[1], len(inputs))
    fence = RowFence.fit(prompts)  # the axes of the users inside the fence, not of one outlier's direction
    inliers = fence.inliers(prompts)
    pca = PCA(n_components=n_comp, random_state=seed)
    if inliers.all() or inliers.sum() < n_comp:
        reduced = pca.fit_transform(prompts)
    else:
        reduced = pca.fit(prompts[inliers]).transform(fence.apply(prompts))
    return stratified_within(_clusters(reduced, k, seed, inputs), budget, k, rng, _uniform_pick(rng))


@register("kmeans_fps")
def kmeans_fps(inputs, budget, k, seed):
    rng = np.random.default_rng(seed)
    return stratified_within(_prompt_clusters(inputs, k, seed), budget, k, rng,
                             _farthest_point_pick(fence_rows(inputs.need("prompts"))))


def _kmeans_binned(clusters, values, inputs, budget, k, seed):
    rng = np.random.default_rng(seed)
    pick = _binned_pick(values, _opt(inputs, "cluster_bins", 5), 2.0, rng, _bin_rule(inputs))
    return stratified_within(clusters, budget, k, rng, pick)


@register("kmeans_loss", needs=("loss",))
def kmeans_loss(inputs, budget, k, seed):
    return _kmeans_binned(_prompt_clusters(inputs, k, seed), inputs.need("loss"), inputs, budget, k, seed)


@register("kmeans_variance", needs=("variance",))
def kmeans_variance(inputs, budget, k, seed):
    """PUMA: K-means on the source prompts + per-cluster variance bins with normal weights."""
    return _kmeans_binned(_prompt_clusters(inputs, k, seed), inputs.need("variance"), inputs, budget, k, seed)


@register("ffn_kmeans", needs=("ffn",))
def ffn_kmeans(inputs, budget, k, seed):
    rng = np.random.default_rng(seed)
    return stratified_within(_ffn_clusters(inputs, k, seed), budget, k, rng, _uniform_pick(rng))


@register("ffn_kmeans_loss", needs=("ffn", "loss"))
def ffn_kmeans_loss(inputs, budget, k, seed):
    return _kmeans_binned(_ffn_clusters(inputs, k, seed), inputs.need("loss"), inputs, budget, k, seed)


@register("ffn_kmeans_variance", needs=("ffn", "variance"))
def ffn_kmeans_variance(inputs, budget, k, seed):
    return _kmeans_binned(_ffn_clusters(inputs, k, seed), inputs.need("variance"), inputs, budget, k, seed)
