"""User selection (Table 4): every registered strategy's contract, PUMA's strata, and the building blocks.

Synthetic users with known structure: 6 well-separated Gaussian blobs of unequal sizes in 16-d (the "preference
profiles" K-means must recover), per-user label variance from a gamma distribution, random loss, and FFN features
derived from the prompts.
"""
from __future__ import annotations

import resource
import time

import numpy as np
import pytest

from puma_ray.config import ConfigError
from puma_ray.selection.strategies import (
    NEEDS,
    STRATEGIES,
    SelectionError,
    SelectionInput,
    allocate,
    binned_quota,
    kmeans_labels,
    normal_weights,
    quantile_bins,
    resolve_budget,
    select,
)

SIZES = np.array([180, 140, 110, 80, 50, 40])  # 600 users, unequal blobs
N, DIM, K = int(SIZES.sum()), 16, len(SIZES)
# strategies whose only randomness is K-means' seed: on well-separated blobs another seed gives the same set
SEED_INSENSITIVE = {"kmeans_fps"}


def make_users(seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (K, DIM))
    centers *= 10 / np.linalg.norm(centers, axis=1, keepdims=True)  # blobs ~10 apart, spread 0.5: separable
    blob = rng.permutation(np.repeat(np.arange(K), SIZES))
    prompts = (centers[blob] + rng.normal(0, 0.5, (N, DIM))).astype(np.float32)
    variance = rng.gamma(2.0, 0.5, N)
    loss = rng.random(N)
    # FFN features as the source model makes them: binarised activations, a function of the prompt (+ noise)
    ffn = ((prompts @ rng.normal(0, 1, (DIM, 48)) + rng.normal(0, 0.5, (N, 48))) > 0).astype(np.float32)
    ffn /= np.linalg.norm(ffn, axis=1, keepdims=True)
    user_ids = np.array([f"u{i:04d}" for i in range(N)])
    return SelectionInput(user_ids, prompts, variance=variance, loss=loss, ffn=ffn), blob


@pytest.fixture(scope="module")
def users():
    return make_users()


# ---------------------------------------------------------------------------------------------- every strategy
def test_registry():
    assert {"random", "variance_bucketing", "loss_bucketing", "kmeans_stratified", "kmeans_pca", "kmeans_fps",
            "kmeans_loss", "kmeans_variance", "ffn_kmeans", "ffn_kmeans_loss", "ffn_kmeans_variance"} <= set(STRATEGIES)
    assert set(NEEDS) == set(STRATEGIES)
    assert NEEDS["kmeans_variance"] == ("variance",)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_exact_budget_distinct_valid(name, users):
    inputs, _ = users
    for budget in (1, 4, 60, N):  # 4 < K: fewer users than clusters; N: everyone
        chosen = select(name, inputs, budget, K, seed=0)
        assert len(chosen) == budget, (name, budget)
        assert len(np.unique(chosen)) == budget
        assert chosen.dtype == np.int64 and chosen.min() >= 0 and chosen.max() < N
        assert np.all(np.diff(chosen) > 0)  # sorted
    assert np.array_equal(select(name, inputs, N, K), np.arange(N))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_deterministic_per_seed(name, users):
    inputs, _ = users
    a = select(name, inputs, 60, K, seed=3)
    b = select(name, inputs, 60, K, seed=3)
    np.testing.assert_array_equal(a, b)
    if name not in SEED_INSENSITIVE:
        assert any(not np.array_equal(a, select(name, inputs, 60, K, seed=s)) for s in (4, 5, 6)), name


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_impossible_budget_or_k(name, users):
    inputs, _ = users
    for budget in (0, -1, N + 1):
        with pytest.raises(SelectionError, match=f"budget {budget} is impossible with {N} users"):
            select(name, inputs, budget, K)
    for k in (0, N + 1):
        with pytest.raises(SelectionError, match=f"K={k} clusters is impossible with {N} users"):
            select(name, inputs, 10, k)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_needs_declared_and_enforced(name, users):
    full, _ = users
    needs = NEEDS[name]
    # with only what NEEDS declares, the strategy runs (callers compute only those statistics)
    only = SelectionInput(full.user_ids, full.prompts, **{k: getattr(full, k) for k in needs})
    assert len(select(name, only, 20, K)) == 20
    for missing in needs:
        partial = SelectionInput(full.user_ids, full.prompts,
                                 **{k: getattr(full, k) for k in needs if k != missing})
        with pytest.raises(SelectionError, match=f"needs per-user '{missing}'"):
            select(name, partial, 20, K)


def test_loss_and_ffn_strategies_need_them(users):
    full, _ = users
    no_loss = SelectionInput(full.user_ids, full.prompts, variance=full.variance, ffn=full.ffn)
    no_ffn = SelectionInput(full.user_ids, full.prompts, variance=full.variance, loss=full.loss)
    for name in ("loss_bucketing", "kmeans_loss", "ffn_kmeans_loss"):
        with pytest.raises(SelectionError, match="'loss'"):
            select(name, no_loss, 20, K)
    for name in ("ffn_kmeans", "ffn_kmeans_loss", "ffn_kmeans_variance"):
        with pytest.raises(SelectionError, match="'ffn'"):
            select(name, no_ffn, 20, K)


def test_unknown_strategy(users):
    inputs, _ = users
    with pytest.raises(SelectionError, match=r"unknown selection strategy 'puma'.*kmeans_variance"):
        select("puma", inputs, 10, K)


def test_farthest_points_with_duplicate_prompts():
    """Identical prompts (e.g. users never trained) must not make farthest-point sampling pick a user twice."""
    x = np.zeros((20, 4), np.float32)
    x[10:] = 5.0  # two clusters, each of 10 identical points
    inputs = SelectionInput(np.arange(20), x)
    for budget in (6, 20):
        chosen = select("kmeans_fps", inputs, budget, 2)
        assert len(np.unique(chosen)) == budget
        if budget == 6:
            assert (chosen < 10).sum() == 3  # 3 per cluster


def test_farthest_points_spread_out():
    """Within one cluster FPS takes the extremes, not the crowd near the centre."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.05, (50, 2)), [[3, 0], [-3, 0], [0, 3], [0, -3]]]).astype(np.float32)
    chosen = select("kmeans_fps", SelectionInput(np.arange(54), x), 5, 1)
    assert set(range(50, 54)) <= set(chosen.tolist())


# ---------------------------------------------------------------------------------------------- PUMA's strata
def _cluster_quota(budget: int) -> np.ndarray:
    """What stratified_within gives each blob: one each, the rest by size (exactly, via allocate)."""
    return 1 + allocate(budget - K, SIZES - 1, SIZES.astype(float))


def _strata_counts(inputs, blob, chosen, budget):
    """Per blob: (selected count per within-blob variance quintile, expected by allocate, bin capacity)."""
    weights = normal_weights(5, 2.0)
    quota = _cluster_quota(budget)
    picked = np.zeros(N, bool)
    picked[chosen] = True
    got, want, cap = [], [], []
    for c in range(K):
        members = np.flatnonzero(blob == c)
        bins = quantile_bins(inputs.variance[members], 5)
        capacity = np.bincount(bins, minlength=5)
        got.append(np.bincount(bins[picked[members]], minlength=5))
        want.append(binned_quota(int(quota[c]), capacity, weights))
        cap.append(capacity)
    return np.array(got), np.array(want), np.array(cap)


def test_kmeans_recovers_the_blobs(users):
    inputs, blob = users
    labels = kmeans_labels(inputs.prompts, K, seed=0)
    # a perfect clustering: every blob is one cluster and every cluster one blob
    pairs = set(zip(blob.tolist(), labels.tolist()))
    assert len(pairs) == K and len({b for b, _ in pairs}) == K and len({c for _, c in pairs}) == K


@pytest.mark.parametrize("seed", [0, 1])
def test_puma_strata_follow_clusters_and_normal_weights(users, seed):
    inputs, blob = users
    budget = 120
    chosen = select("kmeans_variance", inputs, budget, K, seed=seed)

    # clusters: every blob represented, in proportion to its size (one each, then largest remainder)
    per_blob = np.bincount(blob[chosen], minlength=K)
    assert per_blob.min() >= 1
    np.testing.assert_array_equal(per_blob, _cluster_quota(budget))
    assert np.all(np.abs(per_blob - budget * SIZES / N) <= 1.5)

    # within clusters: variance quintiles sampled with normal weights; no bin is short here, so exactly allocate's
    got, want, cap = _strata_counts(inputs, blob, chosen, budget)
    assert np.all(want < cap)  # every bin has capacity to spare: the weights alone decide
    np.testing.assert_array_equal(got, want)
    total = got.sum(0)
    assert total.sum() == budget
    assert total[2] == total.max() and total[2] > total[1] and total[2] > total[3]
    assert max(total[0], total[4]) < min(total[1], total[3])  # the extremes get the least


def test_allocate_is_largest_remainder(users):
    """Leftover units by largest remainder of the exact shares (Hamilton), not by re-sharing the remainder, which
    gave the heaviest group extra every round (36 over the normal bins was [1, 9, 17, 8, 1])."""
    w = normal_weights(5, 2.0)
    assert allocate(36, np.full(5, 1000), w).tolist() == [2, 9, 14, 9, 2]
    rng = np.random.default_rng(0)
    for _ in range(100):  # without capacity limits every group gets floor or ceil of its exact share
        n, total = int(rng.integers(2, 8)), int(rng.integers(1, 60))
        weight = rng.random(n) + 0.01
        share = total * weight / weight.sum()
        got = allocate(total, np.full(n, 1000), weight)
        assert np.all(np.abs(got - share) < 1), (got, share)
    # so PUMA's aggregate over clusters stays within one user per cluster of one per bin and cluster + the rest
    # by the weights (the spectrum rule); by the weights alone under the old rule
    inputs, blob = users
    chosen = select("kmeans_variance", inputs, 120, K, seed=0)
    got, _, _ = _strata_counts(inputs, blob, chosen, 120)
    assert np.all(np.abs(got.sum(0) - (K + (120 - 5 * K) * w)) < K)
    old = SelectionInput(inputs.user_ids, inputs.prompts, variance=inputs.variance, options={"bin_rule": "weights"})
    chosen = select("kmeans_variance", old, 120, K, seed=0)
    got = np.bincount(quantile_bins(inputs.variance, 5)[chosen], minlength=5)
    assert abs(got.sum() - 120) == 0 and got[0] + got[4] < 0.15 * 120


def test_puma_strata_redistribute_full_bins(users):
    """A budget the middle bins cannot hold: the overflow goes to the outer bins, still exactly `budget` users."""
    inputs, blob = users
    budget = 450
    chosen = select("kmeans_variance", inputs, budget, K, seed=0)
    assert len(chosen) == budget
    np.testing.assert_array_equal(np.bincount(blob[chosen], minlength=K), _cluster_quota(budget))
    got, want, cap = _strata_counts(inputs, blob, chosen, budget)
    np.testing.assert_array_equal(got, want)
    assert np.all(got <= cap)
    assert np.all(got[:, 1:4] == cap[:, 1:4])  # middle bins taken whole
    total = got.sum(0)
    assert total[2] >= total.max() and total[0] < total[2]


def test_the_spectrum_rule_keeps_the_extremes_at_a_few_users_a_cluster(users):
    """The review's case: ~6 users a cluster. The weights alone give [0 2 2 2 0] per cluster (no extreme quintile
    ever chosen); the paper's rule spans the whole spectrum and still favours the middle."""
    w = normal_weights(5, 2.0)
    assert binned_quota(6, np.full(5, 100), w, "weights").tolist() == [0, 2, 2, 2, 0]
    assert binned_quota(6, np.full(5, 100), w).tolist() == [1, 1, 2, 1, 1]
    assert binned_quota(3, np.full(5, 100), w).tolist() == [1, 0, 1, 0, 1]  # fewer than bins: spread, ends in
    assert binned_quota(1, np.full(5, 100), w).tolist() == [0, 0, 1, 0, 0]
    assert binned_quota(4, np.array([0, 3, 3, 3, 0]), w).tolist() == [0, 1, 2, 1, 0]  # only bins that have users
    inputs, blob = users
    budget = 36  # 6 a cluster
    by_rule = {}
    for rule in ("spectrum", "weights"):
        x = SelectionInput(inputs.user_ids, inputs.prompts, variance=inputs.variance, options={"bin_rule": rule})
        got, _, _ = _strata_counts(inputs, blob, select("kmeans_variance", x, budget, K, seed=0), budget)
        by_rule[rule] = got
    small = _cluster_quota(budget) <= 7  # the clusters with ~6 users: no extreme quintile under the weights alone
    assert small.sum() >= 3 and by_rule["weights"][small][:, [0, 4]].sum() <= 1  # one tie broken to bin 0
    assert by_rule["spectrum"][small][:, [0, 4]].sum() == 2 * small.sum()
    assert by_rule["spectrum"][:, [0, 4]].sum() >= 2 * K
    quota = _cluster_quota(budget)
    assert (by_rule["spectrum"][quota >= 5] >= 1).all()  # every within-cluster quintile of every cluster
    assert (by_rule["spectrum"][quota == 3] == [1, 0, 1, 0, 1]).all()  # fewer users than bins: ends and middle
    total = by_rule["spectrum"].sum(0)
    assert total[2] == total.max() and total[0] < total[2]  # the middle still weighted most


def test_the_spectrum_rule_is_shared_by_the_bucketing_strategies(users):
    inputs, _ = users
    for name, stat in (("variance_bucketing", inputs.variance), ("loss_bucketing", inputs.loss)):
        chosen = select(name, inputs, 5, K, seed=0)  # fewer users than the 8 global bins: spread over the range
        bins = quantile_bins(stat, 8)[chosen]
        assert 0 in bins and 7 in bins and len(set(bins.tolist())) == 5


# ---------------------------------------------------------------------------------------------- building blocks
def test_allocate_sums_and_proportions():
    counts = allocate(10, np.array([100, 100]), np.array([1.0, 3.0]))
    assert counts.tolist() in ([3, 7], [2, 8])  # 2.5 / 7.5
    counts = allocate(100, np.array([1000] * 4), np.array([1.0, 2.0, 3.0, 4.0]))
    assert counts.tolist() == [10, 20, 30, 40]
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        cap = rng.integers(0, 20, n)
        w = rng.random(n) * (rng.random(n) > 0.2)
        total = int(rng.integers(0, cap.sum() + 1))
        got = allocate(total, cap, w)
        assert got.sum() == total and np.all(got >= 0) and np.all(got <= cap)
        np.testing.assert_array_equal(got, allocate(total, cap.copy(), w.copy()))  # deterministic


def test_allocate_redistributes_what_full_groups_cannot_take():
    counts = allocate(50, np.array([1, 100, 100]), np.array([10.0, 1.0, 1.0]))
    assert counts[0] == 1 and counts.sum() == 50 and abs(int(counts[1]) - int(counts[2])) <= 1
    # zero-weight groups are used only when the weighted ones are full
    assert allocate(3, np.array([2, 5]), np.array([1.0, 0.0])).tolist() == [2, 1]
    assert allocate(4, np.array([2, 5, 5]), np.array([0.0, 0.0, 0.0])).sum() == 4
    # an empty group never receives anything, whatever its weight
    assert allocate(5, np.array([0, 10]), np.array([100.0, 1.0])).tolist() == [0, 5]
    assert allocate(0, np.array([3, 3]), np.array([1.0, 1.0])).tolist() == [0, 0]
    # taking everything fills every group
    assert allocate(9, np.array([2, 3, 4]), np.array([5.0, 0.0, 1.0])).tolist() == [2, 3, 4]


def test_allocate_refuses_more_than_capacity():
    with pytest.raises(SelectionError, match="cannot take 10 from groups holding 9"):
        allocate(10, np.array([2, 3, 4]), np.ones(3))


def test_normal_weights():
    w = normal_weights(5, 2.0)
    assert w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w[::-1])
    assert w.argmax() == 2 and w[0] == w.min()
    x = np.linspace(-3, 3, 8)
    ref = np.exp(-x ** 2 / 2) + 0.1
    np.testing.assert_allclose(normal_weights(8, 3.0, floor=0.1), ref / ref.sum())  # the original's bucketing


def test_quantile_bins_equal_counts_even_with_ties():
    assert np.bincount(quantile_bins(np.zeros(10), 5)).tolist() == [2] * 5
    values = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 5, 5], float)
    bins = quantile_bins(values, 4)
    assert np.bincount(bins).tolist() == [3] * 4
    assert np.all(np.diff(bins[np.argsort(values, kind="stable")]) >= 0)  # monotone in value
    rng = np.random.default_rng(0)
    for n in (7, 11, 99):
        counts = np.bincount(quantile_bins(rng.integers(0, 3, n).astype(float), 5), minlength=5)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert len(quantile_bins(np.zeros(0), 5)) == 0
    assert quantile_bins(np.array([3.0]), 5).tolist() == [0]


def test_resolve_budget():
    assert resolve_budget(200, 943) == 200
    assert resolve_budget(200.0, 943) == 200
    assert resolve_budget(0.1, 943) == 94
    assert resolve_budget(0.001, 100) == 1  # a fraction never resolves to zero users
    assert resolve_budget(0.5, 3) == 2
    for bad in (0, -5, 0.0, -0.1, 1.5, "10", None, float("nan")):
        with pytest.raises(ConfigError, match="selection.budget"):
            resolve_budget(bad, 100)


# ---------------------------------------------------------------------------------------------- scale
@pytest.mark.slow
def test_puma_selection_at_scale():
    """1M users x 64 dims: mini-batch K-means on a 50k sample + chunked assignment; prints time and peak memory."""
    import tracemalloc

    n, d, budget = 1_000_000, 64, 2000
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((15, d), dtype=np.float32) * 3
    prompts = rng.standard_normal((n, d), dtype=np.float32)
    for i in range(0, n, 100_000):  # in chunks: no second full-size temporary
        prompts[i:i + 100_000] += centers[rng.integers(0, 15, min(100_000, n - i))]
    inputs = SelectionInput(np.arange(n), prompts, variance=rng.gamma(2.0, 0.5, n),
                            options={"kmeans_sample": 50_000})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    start = time.perf_counter()
    chosen = select("kmeans_variance", inputs, budget, 15, seed=0)
    wall = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()  # numpy/Python allocations made during the selection
    tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nkmeans_variance {n:,} x {d} (kmeans_sample 50,000, K=15, budget {budget}): {wall:.1f}s; "
          f"allocations during selection peak {traced_peak / 2**20:.0f} MiB; process peak RSS {rss_peak / 1024:.0f} "
          f"MiB (before selection {rss_before / 1024:.0f} MiB; the prompts themselves "
          f"{prompts.nbytes / 2**20:.0f} MiB)")
    assert len(chosen) == budget and len(np.unique(chosen)) == budget
    assert np.bincount(kmeans_labels(prompts, 15, 0, 50_000)[chosen], minlength=15).min() >= 1
    assert wall < 300
    assert traced_peak < prompts.nbytes  # never a second copy of the prompt matrix
