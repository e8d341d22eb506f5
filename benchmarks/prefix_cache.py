"""Prefix cache throughput: records/s cached / uncached, the paper's wording / item-first, in one run.

    .venv/bin/python benchmarks/prefix_cache.py [--quick] [--models tiny:llama models/smollm2-135m] [--batches 8]

Per model and template wording, on MovieLens-100K's item texts (real data files) with random user prompts:
  eq1    Eq. 1's step through the frozen LLM: forward + backward to the prompts (batch 64)
  eval   evaluation: forward only, no grad (batch 256)
`uncached` runs every position of every record; `cached` reads the keys/values of the positions before the user's
slot from the prefix cache (models/prefix_cache.py), which is warmed first: its one-off build (all items' prefixes
for item-first) is reported apart, as `build s`, beside its size. Steady records/s = records / wall of --batches
batches after one warm-up batch. --quick: the tiny model only, fewer batches (under a minute).
The last line: `speed-up: <ratio>x` = eq1 item-first cached / uncached for the last model.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def _rate(plm, task_items: np.ndarray, batch: int, batches: int, backward: bool) -> float:
    from puma_ray.models.heads import RatingHead, task_loss
    head = RatingHead()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randn(batch, plm.l, plm.d, generator=gen) * plm.embed_rms
    labels = torch.randint(1, 6, (batch,), generator=gen).float()
    wall = 0.0
    for step in range(batches + 1):  # the first batch warms up allocators and kernels
        items = task_items[(step * batch) % len(task_items):][:batch]
        items = np.resize(items, batch)
        t0 = time.perf_counter()
        if backward:
            p = prompts.clone().requires_grad_()
            loss = task_loss("rating", head, plm.label_logits(p, plm.encode(items)), labels)[0]
            loss.backward()
        else:
            with torch.no_grad():
                plm.label_logits(prompts, plm.encode(items))
        if step:
            wall += time.perf_counter() - t0
    return batch * batches / wall


def measure(model_name: str, texts: dict[str, str], batches: int, log=print) -> dict:
    from puma_ray.config import TemplateConfig
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.prompted_lm import PromptedLM
    bb = load_backbone(model_name)
    items = np.random.default_rng(0).permutation(np.array(sorted(texts)))
    rows = {}
    for wording in ("paper", "item_first"):
        template = TemplateConfig.for_task("rating", wording)
        plain = PromptedLM(bb, template, 1, texts, prefix_cache_mib=0)
        cached = PromptedLM(bb, template, 1, texts, prefix_cache_mib=4096)
        t0 = time.perf_counter()
        for start in range(0, len(items), 256):  # warm: every item's prefix once (one prefix for the paper's)
            cached.encode(items[start:start + 256])
        build_s = time.perf_counter() - t0
        seq = [plain.sequence(i) for i in items]
        row = {"tokens/record": float(np.mean([len(s) for s in seq])),
               "computed/record": float(np.mean([len(s) - s.index(-1) for s in seq])),
               "build_s": build_s, "cache_mib": cached.prefix_cache.stats.bytes / 2 ** 20}
        for kind, batch, backward in (("eq1", 64, True), ("eval", 256, False)):
            for mode, plm in (("uncached", plain), ("cached", cached)):
                row[f"{kind} {mode}"] = _rate(plm, items, batch, batches, backward)
            row[f"{kind} speed-up"] = row[f"{kind} cached"] / row[f"{kind} uncached"]
        rows[wording] = row
        log(f"{model_name} {wording}: {row['tokens/record']:.0f} tokens/record, {row['computed/record']:.0f} computed "
            f"with the cache; eq1 {row['eq1 uncached']:.0f} → {row['eq1 cached']:.0f} records/s "
            f"({row['eq1 speed-up']:.2f}x), eval {row['eval uncached']:.0f} → {row['eval cached']:.0f} "
            f"({row['eval speed-up']:.2f}x); cache {row['cache_mib']:.1f} MiB built in {build_s:.1f}s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny model only, fewer batches (under a minute)")
    ap.add_argument("--models", nargs="+", default=["tiny:llama", "models/smollm2-135m"])
    ap.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from puma_ray.config import DataConfig
    from puma_ray.data import load_dataset
    from puma_ray.recipes.train_prompts import item_texts
    models, batches = (["tiny:llama"], 4) if args.quick else (args.models, args.batches)
    texts = item_texts(load_dataset(DataConfig()))
    print(f"torch threads {torch.get_num_threads()}, MovieLens-100K item texts ({len(texts):,} items), "
          f"{batches} timed batches per measurement")
    results = {m: measure(m, texts, batches) for m in models}
    print("\n| model | wording | tokens/record | computed (cached) | eq1 records/s uncached → cached | speed-up "
          "| eval records/s uncached → cached | speed-up | cache MiB | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, rows in results.items():
        for wording, r in rows.items():
            print(f"| {m} | {wording} | {r['tokens/record']:.1f} | {r['computed/record']:.1f} | "
                  f"{r['eq1 uncached']:.0f} → {r['eq1 cached']:.0f} | {r['eq1 speed-up']:.2f}x | "
                  f"{r['eval uncached']:.0f} → {r['eval cached']:.0f} | {r['eval speed-up']:.2f}x | "
                  f"{r['cache_mib']:.1f} | {r['build_s']:.1f} |")
    print(f"speed-up: {results[models[-1]]['item_first']['eq1 speed-up']:.2f}x")


if __name__ == "__main__":
    main()
