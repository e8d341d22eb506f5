"""Adapter-fit throughput: Ray Train (1 worker, DeepSpeed ZeRO-2) / the same loop in a plain process, one run.

    .venv/bin/python benchmarks/fit_engine.py [--users 200] [--epochs 3]

Same data (MovieLens-100K users, random source prompts d=48 → tiny:qwen2 d=64), same adapter, same FitConfig.
Samples/s = training records x epochs / the epochs' wall time (each epoch includes its validation pass in both),
so Ray's one-off start-up (controller, worker group, model load, DeepSpeed init) is reported apart. Goal: >= 0.8.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from puma_ray.config import DataConfig, EngineConfig, ModelConfig, TemplateConfig
    from puma_ray.data import load_dataset
    from puma_ray.models.adapter import AdapterConfig, PromptAdapter
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.heads import RatingHead
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.ray_layer import ensure_ray, make_ray_fit
    from puma_ray.recipes.train_prompts import item_texts
    from puma_ray.training.fit import FitConfig, fit_mapping

    ds = load_dataset(DataConfig(max_users=args.users))
    model = ModelConfig(name="tiny:qwen2")
    plm = PromptedLM(load_backbone(model.name), TemplateConfig(), 1, item_texts(ds))
    users = ds.users
    sources = np.random.default_rng(0).normal(0, 1, (len(users), 1, 48)).astype(np.float32)
    cfg = FitConfig(epochs=args.epochs, batch_size=64, patience=args.epochs)
    train, valid = ds.split("train"), ds.split("valid")

    def fresh():
        torch.manual_seed(0)
        return PromptAdapter([48], 64, AdapterConfig(), [1.0], plm.embed_rms), RatingHead()

    torch.set_num_threads(1)  # what each Ray worker gets (EngineConfig.threads_per_worker)
    adapter, head = fresh()
    t0 = time.perf_counter()
    plain = fit_mapping(plm, "rating", adapter, [sources], users, train, valid, head, cfg, log=lambda m: None)
    plain_total = time.perf_counter() - t0
    ensure_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        fit = make_ray_fit(EngineConfig(num_workers=1, cpus_per_worker=1, zero_stage=2), model, tmp, run_name="bench")
        adapter, head = fresh()
        t0 = time.perf_counter()
        on_ray = fit(plm, "rating", adapter, [sources], users, train, valid, head, cfg, log=lambda m: None)
        ray_total = time.perf_counter() - t0
    samples = len(train) * args.epochs
    plain_sps = samples / sum(h["wall_s"] for h in plain.history)
    ray_sps = samples / sum(h["wall_s"] for h in on_ray.history)
    print(f"records {len(train)} x {args.epochs} epochs, {len(users)} users")
    print(f"plain process : {plain_sps:8.1f} samples/s  (total {plain_total:.1f}s)")
    print(f"Ray Train 1w  : {ray_sps:8.1f} samples/s  (total {ray_total:.1f}s, start-up and teardown "
          f"{ray_total - sum(h['wall_s'] for h in on_ray.history):.1f}s)")
    print(f"ratio Ray / plain (in-loop): {ray_sps / plain_sps:.2f}   end-to-end: {plain_total / ray_total:.2f}")


if __name__ == "__main__":
    main()
