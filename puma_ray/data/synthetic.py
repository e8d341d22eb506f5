"""Synthetic rating data with a known ground truth, at any scale (tests, benchmarks, 100k+ user runs).

Generative model (all in "score" units, then cut into 1..5 stars):
    score(u, i) = b_u + b_i + <p_u, q_i> + sigma_u * eps,   eps ~ N(0, 1)
    label       = 1 + #{k : score >= t_k}, thresholds t_1 < ... < t_4
- p_u ~ N(0, I) and q_i ~ N(0, interaction_std^2 / d I): the preference structure a soft prompt should capture;
- b_u, b_i: user and item biases;
- sigma_u lognormal across users: users differ in how noisy their ratings are (METHOD.md's selection uses per-user
  label variance, so it must actually vary);
- which items a user rates: distinct items drawn with Zipf-like popularity (a few items get most ratings);
- how many: min_records + a lognormal extra, capped (heavy tail, like MovieLens);
- when: a per-user start time, then strictly increasing times (exponential gaps), so the chronological split is
  well defined;
- thresholds: the quantiles of the score distribution at the cumulative target marginals (MovieLens-100K's by
  default), estimated once from calibration users drawn by the very same code from their own random stream, so the
  label marginals land on the targets whatever the other settings.

Determinism: every random number comes from a stream keyed by (seed, stream, index): items from (seed, 0),
users in fixed blocks of BLOCK users from (seed, 1, block), calibration from (seed, 2, block). Any chunking of the
users (or a prefix of them: users 0..9999 of a 100k-user run equal a 10k-user run) gives identical records.

On-disk format written by `write_synthetic` (under out_dir, through fsspec):
    records-00000.parquet, ...  user_id, item_id, label (float32), timestamp (int64, Unix s), split; whole users
                                per file, files in user order
    items.parquet               item_id, text
    dataset.json                format, config, split fractions, thresholds, counts, files with row counts;
                                written last, so its presence means the write completed
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from puma_ray.errors import ConfigError
from puma_ray.fs import write_file

from .records import DataError, Dataset, chronological_split, normalise, validate

__all__ = [
    "SyntheticConfig",
    "generate_synthetic",
    "iter_synthetic_chunks",
    "write_synthetic",
    "read_synthetic",
    "synthetic_items",
    "synthetic_ground_truth",
]

FORMAT = "puma_ray.synthetic/1"
# Users are generated in blocks of this many, each block from its own random stream. It is part of the generator's
# definition (changing it changes every dataset), not a tuning knob: chunk sizes are free and never change the data.
BLOCK = 256
CALIBRATION_BLOCKS = 16  # ~4k calibration users, ~250k scores: threshold quantiles to ~0.1 percentage point
_ITEMS, _USERS, _CALIBRATION = 0, 1, 2  # stream ids
# MovieLens-100K's rating counts for 1..5 stars: 6110, 11370, 27145, 34174, 21201 of 100,000.
ML100K_MARGINALS = (0.06110, 0.11370, 0.27145, 0.34174, 0.21201)
# Two words per latent dimension (its positive and negative direction): the item text names an item's strongest
# dimensions, so a language model reading the text sees the same structure the ratings come from.
GENRES = (
    "drama", "comedy", "action", "romance", "horror", "documentary", "thriller", "animation",
    "science fiction", "musical", "western", "fantasy", "mystery", "biography", "war", "family",
    "crime", "sports", "history", "adventure", "noir", "satire", "anime", "superhero",
    "independent", "classic", "experimental", "blockbuster", "foreign", "teen", "spy", "disaster",
)  # fmt: skip
QUALITY = ("panned", "mixed reviews", "well reviewed", "acclaimed")  # item-bias quartiles, worst to best
SCHEMA = pa.schema(
    [("user_id", pa.string()), ("item_id", pa.string()), ("label", pa.float32()), ("timestamp", pa.int64()),
     ("split", pa.string())]
)  # fmt: skip
ITEMS_SCHEMA = pa.schema([("item_id", pa.string()), ("text", pa.string())])


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 1000  # enough for K-means selection and a held-out set, small enough for a laptop run
    n_items: int = 2000  # about MovieLens-100K's 1,682 items
    latent_dim: int = 8  # a handful of "genres"; at most len(GENRES) // 2 so each direction has a word
    seed: int = 0
    user_bias_std: float = 0.5  # users differ in leniency, as in real ratings
    item_bias_std: float = 0.5  # items differ in quality; shown in the item text as QUALITY words
    interaction_std: float = 1.0  # std of <p_u, q_i>: preferences outweigh biases, so personalization pays
    noise_median: float = 0.5  # typical per-user noise std, below the ~1.2 signal std: ratings are learnable
    noise_log_sigma: float = 0.8  # spread of per-user noise std: 10th..90th percentile ~0.18..1.4, so per-user
    #                               label std (what selection sees) tracks it (correlation ~0.65 at the defaults)
    min_records: int = 20  # the paper's Amazon filter keeps users with >= 20 ratings (MovieLens's minimum too)
    records_median_extra: float = 30.0  # median user has ~50 records (MovieLens-100K: 65)
    records_log_sigma: float = 0.9  # heavy tail: ~1% of users above ~250 records
    max_records: int = 400  # cap on the tail; must stay <= n_items // 2 so distinct items are easy to draw
    zipf_exponent: float = 0.9  # popularity ~ 1/rank^0.9: top 10% of items hold about half the ratings
    label_marginals: tuple = ML100K_MARGINALS  # target share of 1..5 stars
    start_time: int = 1_420_070_400  # 2015-01-01 UTC: users start uniformly in [start, start + span)
    span_days: float = 1095.0  # three years of user arrivals
    mean_gap_hours: float = 24.0  # a rating a day on average: a 50-record user spans ~2 months

    def __post_init__(self):
        def check(ok: bool, msg: str):
            if not ok:
                raise ConfigError(f"synthetic data options (data.options): {msg}")  # a user error: one line

        for name in ("n_users", "n_items", "latent_dim", "seed", "min_records", "max_records", "start_time"):
            v = getattr(self, name)
            check(isinstance(v, (int, np.integer)) and not isinstance(v, bool), f"{name} must be an int, got {v!r}")
        check(1 <= self.n_users < 10**8, f"n_users must be in 1..10^8-1 (8-digit ids), got {self.n_users}")
        check(self.n_items < 10**7, f"n_items must be below 10^7 (7-digit ids), got {self.n_items}")
        check(1 <= self.latent_dim <= len(GENRES) // 2, f"latent_dim must be in 1..{len(GENRES) // 2}")
        check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        for name in ("user_bias_std", "item_bias_std", "interaction_std", "noise_log_sigma", "records_log_sigma"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.noise_median > 0, f"noise_median must be > 0, got {self.noise_median}")
        check(self.interaction_std + self.user_bias_std + self.item_bias_std + self.noise_median > 0, "no variance")
        # >= 3 so chronological_split gives every user a valid and a test record
        check(self.min_records >= 3, f"min_records must be >= 3, got {self.min_records}")
        check(self.records_median_extra >= 0, f"records_median_extra must be >= 0, got {self.records_median_extra}")
        check(self.max_records >= self.min_records, "max_records must be >= min_records")
        check(
            2 * self.max_records <= self.n_items,
            f"max_records ({self.max_records}) must be <= n_items // 2 ({self.n_items // 2})",
        )
        # a steeper popularity makes distinct items too rare to draw for heavy users
        check(0 <= self.zipf_exponent <= 1.5, f"zipf_exponent must be in [0, 1.5], got {self.zipf_exponent}")
        m = np.asarray(self.label_marginals, dtype=float)
        check(m.shape == (5,) and (m > 0).all(), "label_marginals must be 5 positive shares for 1..5 stars")
        check(abs(m.sum() - 1) < 1e-6, f"label_marginals must sum to 1, got {m.sum()}")
        check(self.span_days >= 0 and self.mean_gap_hours > 0, "span_days must be >= 0 and mean_gap_hours > 0")

    @classmethod
    def from_dict(cls, d: dict) -> SyntheticConfig:
        """Inverse of dataclasses.asdict (as stored in dataset.json, where tuples became lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ------------------------------------------------------------------------------------------------------- items
@dataclass
class _Items:
    ids: np.ndarray  # object array of "i0000042"
    factors: np.ndarray  # (n_items, d) q_i
    bias: np.ndarray  # b_i
    popularity: np.ndarray  # probability of being picked by a draw
    cdf: np.ndarray  # cumulative popularity, for inverse-CDF sampling


def _rng(cfg: SyntheticConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, *key]))


def _make_items(cfg: SyntheticConfig) -> _Items:
    rng = _rng(cfg, _ITEMS)
    d = cfg.latent_dim
    factors = rng.standard_normal((cfg.n_items, d)) * (cfg.interaction_std / math.sqrt(d))
    bias = rng.normal(0.0, cfg.item_bias_std, cfg.n_items)
    # popularity rank drawn independently of factors and bias: popular items are not systematically better
    rank = rng.permutation(cfg.n_items)
    weights = 1.0 / (rank + 1.0) ** cfg.zipf_exponent
    popularity = weights / weights.sum()
    ids = np.array([f"i{i:07d}" for i in range(cfg.n_items)], dtype=object)
    return _Items(ids, factors, bias, popularity, np.cumsum(popularity))


def _item_text(index: int, factors: np.ndarray, bias: float, bias_std: float) -> str:
    """"Item 42: comedy, war; acclaimed": the two strongest latent directions as genre words, the bias as quality."""
    top = np.argsort(-np.abs(factors), kind="stable")[: min(2, len(factors))]
    genres = ", ".join(GENRES[2 * k + int(factors[k] < 0)] for k in top)
    quartiles = np.array([-0.6745, 0.0, 0.6745]) * bias_std  # N(0, bias_std) quartile boundaries
    return f"Item {index}: {genres}; {QUALITY[int(np.searchsorted(quartiles, bias, side='right'))]}"


def synthetic_items(cfg: SyntheticConfig) -> pd.DataFrame:
    """The items table (item_id, text)."""
    it = _setup(cfg)[0]
    texts = [_item_text(i, it.factors[i], it.bias[i], cfg.item_bias_std) for i in range(cfg.n_items)]
    return pd.DataFrame({"item_id": it.ids, "text": texts})


# ------------------------------------------------------------------------------------------------------- users
@dataclass
class _Users:
    factors: np.ndarray  # (BLOCK, d) p_u
    bias: np.ndarray  # b_u
    noise: np.ndarray  # sigma_u
    n_records: np.ndarray  # int64
    start: np.ndarray  # int64 Unix s of the first record


def _draw_users(cfg: SyntheticConfig, rng: np.random.Generator) -> _Users:
    """The per-user parameters of one block: always the first draws of the block's stream (ground truth reuses it)."""
    factors = rng.standard_normal((BLOCK, cfg.latent_dim))
    bias = rng.normal(0.0, cfg.user_bias_std, BLOCK)
    noise = cfg.noise_median * np.exp(rng.normal(0.0, cfg.noise_log_sigma, BLOCK))
    extra = cfg.records_median_extra * np.exp(rng.normal(0.0, cfg.records_log_sigma, BLOCK))
    n_records = np.minimum(cfg.min_records + np.floor(extra).astype(np.int64), cfg.max_records)
    start = cfg.start_time + rng.integers(0, max(1, int(cfg.span_days * 86400)), BLOCK, dtype=np.int64)
    return _Users(factors, bias, noise, n_records, start)


def _group_rank(owners: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal owners (owners sorted)."""
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(owners)]))
    return np.arange(len(owners)) - run_start


def _sample_items(rng: np.random.Generator, n_records: np.ndarray, cdf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each user's n_records distinct items, drawn with popularity weights; returns (owner, item) grouped by owner,
    each owner's items in draw order (their order in time).

    Vectorised over the block: draw with replacement (oversampled), keep each (user, item)'s first draw, redraw for
    users still short. Popular items repeat often, so the oversampling factor doubles each round.
    """
    n_items = len(cdf)
    owners = np.empty(0, dtype=np.int64)
    picks = np.empty(0, dtype=np.int64)
    need = n_records.copy()
    factor = 2
    for _ in range(64):
        draw_n = np.where(need > 0, factor * need + 4, 0)
        new_owners = np.repeat(np.arange(len(need)), draw_n)
        new_picks = np.minimum(np.searchsorted(cdf, rng.random(int(draw_n.sum())), side="right"), n_items - 1)
        owners, picks = np.r_[owners, new_owners], np.r_[picks, new_picks]
        _, first = np.unique(owners * n_items + picks, return_index=True)
        first.sort()  # first occurrences, in draw order (earlier rounds first)
        order = first[np.argsort(owners[first], kind="stable")]  # grouped by owner, draw order kept within
        owners, picks = owners[order], picks[order]
        need = n_records - np.bincount(owners, minlength=len(need))
        if (need <= 0).all():
            keep = _group_rank(owners) < n_records[owners]
            return owners[keep], picks[keep]
        factor = min(2 * factor, 64)
    raise RuntimeError("could not draw enough distinct items; lower zipf_exponent or max_records")  # unreachable


@dataclass
class _Block:
    owners: np.ndarray  # user index within the block, grouped
    items: np.ndarray  # item index
    score: np.ndarray  # continuous score
    timestamp: np.ndarray  # int64


def _draw_block(cfg: SyntheticConfig, items: _Items, stream: int, block: int) -> _Block:
    rng = _rng(cfg, stream, block)
    users = _draw_users(cfg, rng)
    owners, picks = _sample_items(rng, users.n_records, items.cdf)
    # strictly increasing per user: gaps of at least one second
    gaps = 1 + np.floor(rng.exponential(cfg.mean_gap_hours * 3600.0, len(owners))).astype(np.int64)
    elapsed = np.cumsum(gaps)
    run_start = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    offset = np.repeat(elapsed[run_start] - gaps[run_start], np.diff(np.r_[run_start, len(owners)]))
    timestamp = users.start[owners] + elapsed - offset
    interaction = np.einsum("ij,ij->i", users.factors[owners], items.factors[picks])
    eps = rng.standard_normal(len(owners))
    score = users.bias[owners] + items.bias[picks] + interaction + users.noise[owners] * eps
    return _Block(owners, picks, score, timestamp)


def _thresholds(cfg: SyntheticConfig, items: _Items) -> np.ndarray:
    """Score cut points whose label shares match cfg.label_marginals, from calibration users (own stream)."""
    scores = np.concatenate([_draw_block(cfg, items, _CALIBRATION, b).score for b in range(CALIBRATION_BLOCKS)])
    return np.quantile(scores, np.cumsum(cfg.label_marginals)[:-1])


@functools.lru_cache(maxsize=4)
def _setup(cfg: SyntheticConfig) -> tuple[_Items, np.ndarray]:
    """Items and thresholds of a config, computed once per config (the calibration draws ~250k scores)."""
    items = _make_items(cfg)
    return items, _thresholds(cfg, items)


def _labels(score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return (1 + np.searchsorted(thresholds, score, side="right")).astype(np.float32)


_NO_ITEMS = pd.DataFrame({"item_id": pd.Series(dtype=object), "text": pd.Series(dtype=object)})


def _chunk_frame(items: _Items, thresholds, blocks: dict, lo: int, hi: int, valid_frac, test_frac) -> pd.DataFrame:
    """Records of users lo..hi-1 (normalised, split), cutting them out of the blocks that hold them."""
    parts = []
    for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1):
        blk = blocks[b]
        user = b * BLOCK + blk.owners
        sel = (user >= lo) & (user < hi)
        ids = np.array([f"u{b * BLOCK + k:08d}" for k in range(BLOCK)], dtype=object)
        parts.append(
            pd.DataFrame(
                {
                    "user_id": ids[blk.owners[sel]],
                    "item_id": items.ids[blk.items[sel]],
                    "label": _labels(blk.score[sel], thresholds),
                    "timestamp": blk.timestamp[sel],
                }
            )
        )
    records, _ = normalise(pd.concat(parts, ignore_index=True), _NO_ITEMS)
    return chronological_split(records, valid_frac, test_frac)


def iter_synthetic_chunks(
    cfg: SyntheticConfig, users_per_chunk: int = 4 * BLOCK, valid_frac: float = 0.1, test_frac: float = 0.1
) -> Iterator[pd.DataFrame]:
    """Yields the records of consecutive user ranges, already split; concatenated they are the whole dataset
    (sorted by user_id, timestamp, item_id) whatever users_per_chunk is."""
    if users_per_chunk < 1:
        raise ValueError(f"users_per_chunk must be >= 1, got {users_per_chunk}")
    items, thresholds = _setup(cfg)
    blocks: dict[int, _Block] = {}  # only the blocks the current chunk touches (a boundary block is shared)
    for lo in range(0, cfg.n_users, users_per_chunk):
        hi = min(lo + users_per_chunk, cfg.n_users)
        needed = range(lo // BLOCK, (hi - 1) // BLOCK + 1)
        blocks = {b: blocks[b] if b in blocks else _draw_block(cfg, items, _USERS, b) for b in needed}
        yield _chunk_frame(items, thresholds, blocks, lo, hi, valid_frac, test_frac)


def _provenance(cfg: SyntheticConfig, thresholds: np.ndarray, valid_frac: float, test_frac: float) -> dict:
    return {
        "source": "synthetic",
        "format": FORMAT,
        "config": asdict(cfg),
        "split": {"valid_frac": valid_frac, "test_frac": test_frac},
        "thresholds": [float(t) for t in thresholds],
        "timestamp_unit": "s",
    }


def generate_synthetic(
    cfg: SyntheticConfig, valid_frac: float = 0.1, test_frac: float = 0.1, users_per_chunk: int = 4 * BLOCK
) -> Dataset:
    """The whole dataset in memory (task "rating")."""
    records = pd.concat(
        iter_synthetic_chunks(cfg, users_per_chunk, valid_frac, test_frac), ignore_index=True
    )
    provenance = _provenance(cfg, _setup(cfg)[1], valid_frac, test_frac)
    ds = Dataset(records, synthetic_items(cfg), "rating", f"synthetic-s{cfg.seed}", provenance)
    return validate(ds, "generate_synthetic")


def synthetic_ground_truth(cfg: SyntheticConfig) -> dict:
    """The parameters the data was drawn from, for tests and for judging what a model recovered.

    Arrays are indexed by user / item number (user_ids[k] = "u%08d" % k); memory is O(n_users * latent_dim).
    """
    items, thresholds = _setup(cfg)
    n_blocks = (cfg.n_users - 1) // BLOCK + 1
    users = [_draw_users(cfg, _rng(cfg, _USERS, b)) for b in range(n_blocks)]

    def cat(name):
        return np.concatenate([getattr(u, name) for u in users])[: cfg.n_users]

    return {
        "user_ids": np.array([f"u{k:08d}" for k in range(cfg.n_users)], dtype=object),
        "user_factors": cat("factors"),
        "user_bias": cat("bias"),
        "noise_scale": cat("noise"),
        "n_records": cat("n_records"),
        "item_ids": items.ids,
        "item_factors": items.factors.copy(),  # copies: the cached arrays must not be changed by a caller
        "item_bias": items.bias.copy(),
        "popularity": items.popularity.copy(),
        "thresholds": thresholds.copy(),
    }


# ------------------------------------------------------------------------------------------------- persistence
def _write_table(fs, path: str, df: pd.DataFrame, schema: pa.Schema) -> None:
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_file(fs, path, memoryview(sink.getvalue()))  # atomic: a data file is whole or absent


def write_synthetic(
    cfg: SyntheticConfig,
    out_dir: str,
    rows_per_file: int = 1_000_000,
    storage_options: dict | None = None,
    *,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    users_per_chunk: int = 4 * BLOCK,
) -> dict:
    """Streams the dataset to Parquet under out_dir (local or any fsspec URL); returns the dataset.json content.

    Memory is bounded by about rows_per_file records plus one chunk, whatever n_users is. A file holds whole
    users and about rows_per_file rows (it is closed once it reaches that, so it may exceed it by one chunk).
    """
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    fs, root = fsspec.core.url_to_fs(out_dir, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    items = synthetic_items(cfg)
    _write_table(fs, f"{root}/items.parquet", items, ITEMS_SCHEMA)
    files, buffer, buffered = [], [], 0
    users = 0
    per_split = dict.fromkeys(("train", "valid", "test"), 0)

    def flush():
        nonlocal buffer, buffered
        frame = pd.concat(buffer, ignore_index=True)
        validate(Dataset(frame, items, "rating", f"synthetic-s{cfg.seed}"), f"file {len(files)}")
        name = f"records-{len(files):05d}.parquet"
        _write_table(fs, f"{root}/{name}", frame, SCHEMA)
        files.append({"path": name, "rows": int(len(frame))})
        buffer, buffered = [], 0

    for chunk in iter_synthetic_chunks(cfg, users_per_chunk, valid_frac, test_frac):
        users += int(chunk["user_id"].nunique())
        for s, n in chunk["split"].value_counts().items():
            per_split[s] += int(n)
        buffer.append(chunk)
        buffered += len(chunk)
        if buffered >= rows_per_file:
            flush()
    if buffer:
        flush()
    manifest = {
        **_provenance(cfg, _setup(cfg)[1], valid_frac, test_frac),
        "name": f"synthetic-s{cfg.seed}",
        "task": "rating",
        "counts": {"users": users, "items": int(len(items)), "records": per_split},
        "files": files,
        "items_file": "items.parquet",
    }
    write_file(fs, f"{root}/dataset.json", json.dumps(manifest, indent=2).encode())  # last, atomically
    return manifest


def read_synthetic(out_dir: str, storage_options: dict | None = None) -> Dataset:
    """Reads back what write_synthetic wrote (all records in memory: for small and medium datasets)."""
    fs, root = fsspec.core.url_to_fs(out_dir, **(storage_options or {}))
    try:
        with fs.open(f"{root}/dataset.json", "r") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{out_dir}: no dataset.json (not a synthetic dataset, or its write did not finish)") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{out_dir}/dataset.json: format {manifest.get('format')!r}, expected {FORMAT!r}")

    def read(name):
        with fs.open(f"{root}/{name}", "rb") as f:
            return pq.read_table(f).to_pandas()

    parts = []
    for entry in manifest["files"]:
        parts.append(read(entry["path"]))
        if len(parts[-1]) != entry["rows"]:
            raise DataError(f"{out_dir}/{entry['path']}: {len(parts[-1])} rows, dataset.json says {entry['rows']}")
    records = pd.concat(parts, ignore_index=True)
    records, items = normalise(records, read(manifest["items_file"]))
    provenance = {k: v for k, v in manifest.items() if k not in ("files", "items_file")}
    provenance["path"] = out_dir
    return validate(Dataset(records, items, manifest["task"], manifest["name"], provenance), out_dir)
