"""Which users each selection rule picks, by variance quintile: the paper's "whole spectrum, medium weighted" rule
(`bin_rule: spectrum`, the default) against the weights-only rule it replaced and random selection.

    .venv/bin/python benchmarks/selection_spectrum.py --store runs/X/source-store [--budget 94] [--seeds 0 1 2]

The store is any source store of MovieLens-100K (the default migration writes one under its run folder);
variance is each user's training-label variance, quintiles over all users. Prints per seed and rule the chosen
users per quintile and their variance spread (std), then the mean over seeds.
"""
from __future__ import annotations

import argparse

import numpy as np

from puma_ray.artifacts.store import PromptStore
from puma_ray.config import DataConfig
from puma_ray.data import load_dataset
from puma_ray.selection.statistics import label_variance
from puma_ray.selection.strategies import SelectionInput, quantile_bins, select


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--budget", type=int, default=94)  # 10% of ML-100K's 943 users: the default's budget
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    users, prompts = PromptStore.open(args.store).read_all()
    ds = load_dataset(DataConfig(name="movielens100k"))
    variance = label_variance(ds.split("train"), users)
    quintile = quantile_bins(variance, 5)
    rows = {}
    for seed in args.seeds:
        for label, name, rule in (("PUMA, spectrum rule", "kmeans_variance", "spectrum"),
                                  ("PUMA, weights only (before)", "kmeans_variance", "weights"),
                                  ("random", "random", "spectrum")):
            inputs = SelectionInput(users, prompts.reshape(len(users), -1), variance=variance,
                                    options={"bin_rule": rule})
            chosen = select(name, inputs, args.budget, args.k, seed)
            counts = np.bincount(quintile[chosen], minlength=5)
            rows.setdefault(label, []).append((counts, float(np.std(variance[chosen]))))
            print(f"seed {seed} {label:30s} per quintile {counts.tolist()}  extremes {counts[0] + counts[4]:3d}  "
                  f"variance std {np.std(variance[chosen]):.3f}")
    print(f"\nmean over seeds {args.seeds} (budget {args.budget}, K={args.k}; all users' variance std "
          f"{np.std(variance):.3f}):")
    for label, got in rows.items():
        counts = np.mean([c for c, _ in got], axis=0)
        print(f"  {label:30s} per quintile {np.round(counts, 1).tolist()}  extremes {counts[0] + counts[4]:.1f}  "
              f"variance std {np.mean([s for _, s in got]):.3f}")


if __name__ == "__main__":
    main()
