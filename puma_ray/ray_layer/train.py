"""The adapter fit on Ray Train: N workers, each a DeepSpeed engine around adapter + head, the frozen target LLM
loaded on every worker from its id/path (never checkpointed), training records sharded through Ray Data.

Checkpoints (every epoch, to the run's storage path, local or S3) hold the DeepSpeed state of adapter + head +
optimizer, the current and best adapter/head weights (safetensors) and the early-stopping state. A run restarted
with the same name and storage resumes from the latest; a worker failure is retried from it (FailureConfig). With a
different number of workers the weights resume and the optimizer moments restart (ZeRO partitions them per rank).
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import EngineConfig, ModelConfig
from ..fit import FitConfig, FitResult
from ..fs import StorageOptions, pyarrow_filesystem
from ..metrics import PRIMARY
from ..training import Cost, describe_epoch

_STATE, _BEST, _CURRENT, _DS_TAG = "fit_state.json", "best.safetensors", "current.safetensors", "ds"


class _MappingWithHead(nn.Module):
    """What DeepSpeed trains: the mapping and the head. The frozen LLM is deliberately not a submodule."""

    def __init__(self, mapping: nn.Module, head: nn.Module):
        super().__init__()
        self.mapping, self.head = mapping, head

    def forward(self, plm, sources: list[torch.Tensor], enc: dict, labels: torch.Tensor, task: str):
        from ..heads import task_loss
        logits = plm.label_logits(self.mapping(*sources), enc)
        return task_loss(task, self.head, logits, labels)[0]


def _deepspeed_config(cfg: dict) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg["fit"].batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg["fit"].grad_clip or 0.0,
        "zero_optimization": {"stage": cfg["zero_stage"]},
        "bf16": {"enabled": cfg["precision"] == "bf16"},
        "fp16": {"enabled": cfg["precision"] == "fp16"},
        "steps_per_print": 10 ** 9,  # our own per-epoch log is enough
    }
    if cfg["optimizer"] != "torch_adamw":  # DeepSpeed's own (compiled) optimizers
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg["fit"].lr, "weight_decay": cfg["fit"].weight_decay,
                                                       "torch_adam": False}}
        if cfg["optimizer"] == "cpu_adam":
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return ds


def _save_weights(module: _MappingWithHead, path: str) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}, path)


def _worker_loop(cfg: dict) -> None:
    import ray.train as rt
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg["use_gpu"] else "cpu")
    import deepspeed

    from ..backbone import load_backbone
    from ..config import TemplateConfig
    from ..metrics import PRIMARY, better
    from ..prompted_lm import PromptedLM
    from ..training import RecordSet, epoch_record, evaluate

    torch.set_num_threads(cfg["threads"])
    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    m = cfg["model"]
    backbone = load_backbone(m.name, m.revision, m.dtype, m.seed)
    if backbone.identity.fingerprint != cfg["fingerprint"]:
        raise RuntimeError(f"worker {rank} loaded {backbone.identity.describe()}, whose weights differ from the "
                           f"driver's target (fingerprint {cfg['fingerprint'][:12]})")
    device = rt.torch.get_device() if cfg["use_gpu"] else torch.device("cpu")
    backbone.model.to(device)
    plm = PromptedLM(backbone, TemplateConfig(**cfg["template"]), cfg["l"], cfg["item_texts"])
    fit: FitConfig = cfg["fit"]
    task, users = cfg["task"], pd.Index(cfg["users"])  # indexed once: every batch maps its users through it
    module = _MappingWithHead(cfg["mapping"], cfg["head"])
    groups = [{"params": list(module.head.parameters()), "lr": fit.head_lr}]
    mapping_params = [p for p in module.mapping.parameters() if p.requires_grad]
    if mapping_params:
        groups.insert(0, {"params": mapping_params, "lr": fit.lr, "weight_decay": fit.weight_decay})
    optimizer = torch.optim.AdamW(groups) if cfg["optimizer"] == "torch_adamw" else None
    steps = fit.epochs * max(1, math.ceil(cfg["train_rows"] / world / fit.batch_size))

    def schedule(opt):
        return (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if fit.schedule == "cosine"
                else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))

    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, model_parameters=None if optimizer else groups,
        config=_deepspeed_config(cfg), lr_scheduler=schedule)
    dtype = next(engine.module.parameters()).dtype
    tables = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in cfg["inputs"]]

    def prompts_for(idx):
        return engine.module.mapping(*[t[idx].to(device=device, dtype=dtype) for t in tables])

    state = {"epoch": -1, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": [], "world_size": world,
             "resumed_from": None, "counts": [0, 0, 0, 0]}
    checkpoint = rt.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            with open(os.path.join(d, _STATE)) as f:
                saved = json.load(f)
            if saved["world_size"] == world:
                engine.load_checkpoint(d, tag=_DS_TAG)
            else:  # ZeRO optimizer partitions are per rank: keep the weights, restart the moments
                engine.module.load_state_dict(load_file(os.path.join(d, _CURRENT)))
            best_weights = load_file(os.path.join(d, _BEST))
        state.update(saved, world_size=world, resumed_from=saved["epoch"])
    else:
        best_weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    metric = PRIMARY[task][0]
    valid_set = RecordSet.from_frame(cfg["valid"], users)
    shard = rt.get_dataset_shard("train")
    for epoch in range(state["epoch"] + 1, fit.epochs):
        start = time.perf_counter()
        engine.train()
        losses = []
        for batch_df in shard.iter_batches(batch_size=fit.batch_size, batch_format="pandas",
                                           local_shuffle_buffer_size=16 * fit.batch_size,
                                           local_shuffle_seed=fit.seed + epoch):
            batch = RecordSet.from_frame(batch_df, users)
            enc = plm.encode(batch.item_ids, batch.histories)
            idx = torch.from_numpy(batch.user_index)
            loss = engine(plm, [t[idx].to(device=device, dtype=dtype) for t in tables], enc,
                          torch.from_numpy(batch.labels).to(device), task)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.item()))
            state["counts"][0] += len(batch)
            state["counts"][1] += int(enc["attention_mask"].sum())
        engine.eval()
        eval_cost = Cost()
        valid_metrics = evaluate(plm, engine.module.head, task, prompts_for, valid_set, fit.eval_batch_size,
                                 eval_cost)
        state["counts"][2] += eval_cost.forward_records
        state["counts"][3] += eval_cost.tokens_forward
        score = valid_metrics[metric]
        if state["best"] is None or better(task, score, state["best"]):
            state.update(best=score, best_epoch=epoch, bad_epochs=0)
            best_weights = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append(epoch_record(epoch, losses, valid_metrics, start, workers=world))
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=_DS_TAG)  # every rank: ZeRO state is partitioned
            if rank == 0:
                _save_weights(engine.module, os.path.join(d, _CURRENT))
                save_file({k: v.contiguous() for k, v in best_weights.items()}, os.path.join(d, _BEST))
                with open(os.path.join(d, _STATE), "w") as f:
                    json.dump(state, f)
            rt.report({"epoch": epoch, metric: score, "train_loss": state["history"][-1]["train_loss"]},
                      checkpoint=rt.Checkpoint.from_directory(d))
        if cfg.get("pid_dir"):  # after the report: a fault-injection test kills a worker with a checkpoint to go to
            with open(os.path.join(cfg["pid_dir"], f"rank{rank}.pid"), "w") as f:
                f.write(f"{os.getpid()} {epoch}")
        if state["bad_epochs"] > fit.patience:
            break


def make_ray_fit(engine: EngineConfig, model: ModelConfig, storage_path: str, storage: StorageOptions | None = None,
                 run_name: str = "puma", pid_dir: str | None = None):
    """A function with fit.fit_mapping's signature that runs the fit on Ray Train + DeepSpeed."""

    def ray_fit(plm, task, mapping, inputs, users, train, valid, head, cfg: FitConfig, log=print, name="fit",
                on_epoch=None) -> FitResult:
        import ray
        from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from .session import ensure_ray
        ensure_ray(engine.address, engine.local_cpus)
        columns = [c for c in ("user_id", "item_id", "label", "history") if c in train.columns]
        # records arrive grouped by user; shuffled once here (and locally per epoch in the workers), or batches
        # hold one user each and the fit stalls (seen: train loss flat where the in-process fit learned)
        order = np.random.default_rng(cfg.seed).permutation(len(train))
        train_ds = ray.data.from_pandas(train[columns].iloc[order].reset_index(drop=True))
        loop_cfg = {
            "model": model, "fingerprint": plm.backbone.identity.fingerprint, "template": vars(plm.template),
            "l": plm.l, "item_texts": plm._item_text, "task": task, "users": users, "inputs": inputs,
            "mapping": mapping, "head": head, "fit": cfg, "valid": valid, "train_rows": len(train),
            "threads": engine.threads_per_worker, "use_gpu": engine.use_gpu, "zero_stage": engine.zero_stage,
            "precision": engine.precision, "optimizer": engine.optimizer, "pid_dir": pid_dir,
        }
        fs, path = pyarrow_filesystem(storage_path, storage)
        trainer = TorchTrainer(
            _worker_loop, train_loop_config=loop_cfg,
            scaling_config=ScalingConfig(num_workers=engine.num_workers, use_gpu=engine.use_gpu,
                                         resources_per_worker={"CPU": engine.cpus_per_worker}),
            run_config=RunConfig(name=f"{run_name}-{name}", storage_path=path, storage_filesystem=fs,
                                 failure_config=FailureConfig(max_failures=engine.max_failures)),
            datasets={"train": train_ds})
        start = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - start
        checkpoint: Checkpoint = result.checkpoint
        with checkpoint.as_directory() as d:
            with open(os.path.join(d, _STATE)) as f:
                state = json.load(f)
            best = load_file(os.path.join(d, _BEST))
        fitted = _MappingWithHead(copy.deepcopy(mapping), copy.deepcopy(head))
        fitted.load_state_dict(best)
        fitted.eval()
        metric = PRIMARY[task][0]
        for h in state["history"]:
            log("  " + describe_epoch(h, metric))
        world = engine.num_workers
        cost = Cost(wall_s=wall, forward_records=(state["counts"][0] + state["counts"][2]) * world,
                    backward_records=state["counts"][0] * world,
                    tokens_forward=(state["counts"][1] + state["counts"][3]) * world,
                    tokens_backward=state["counts"][1] * world,
                    flops_per_token=2.0 * (plm.backbone.identity.num_params or 0))
        return FitResult(fitted.mapping, fitted.head, state["history"], state["best_epoch"],
                         {"best": state["best"], "resumed_from": state["resumed_from"]}, cost)

    return ray_fit
