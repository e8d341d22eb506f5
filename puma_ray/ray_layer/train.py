"""The adapter fit on Ray Train: N workers, each a DeepSpeed engine around adapter + head, the frozen target LLM
loaded on every worker from its id/path (never checkpointed), training records sharded through Ray Data.

Checkpoints (every epoch, to the run's storage path, local or S3) hold only safetensors and JSON: the current and
best adapter/head weights, each rank's Adam moments, and the loop state (history, early stopping, cost, the
schedule's position). The run's folder is `<run name>-<fit name>-<identity>` (training/run_identity.py: a hash of the
fit's settings, inputs and code version): only the same fit restarted resumes from the latest checkpoint, checked
first (no pickle is ever read); a worker failure is retried from it (FailureConfig). With a different number of
workers the weights resume and the optimizer moments restart (ZeRO partitions them per rank).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
import time

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from puma_ray.artifacts.formats import FIT_BEST, FIT_CURRENT, FIT_OPTIMIZER_PREFIX, FIT_STATE
from puma_ray.config import EngineConfig, ModelConfig, TemplateConfig
from puma_ray.errors import CheckpointError, PumaError
from puma_ray.fs import StorageOptions, filesystem, join, pyarrow_filesystem
from puma_ray.models.backbone import load_backbone
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.tasks import get_task
from puma_ray.tools.deepspeed_ops import use_own_extensions_dir
from puma_ray.training.cost import Cost
from puma_ray.training.evaluate import evaluate
from puma_ray.training.fit import FitConfig, FitResult, adapter_param_groups, epoch_orders, fit_identity
from puma_ray.training.loop import EpochSteps, LoopState, describe_epoch, lr_schedule, run_epochs
from puma_ray.training.records import RecordSet

from .compat import user_error
from .progress import LiveLines, sender

_STATE, _BEST, _CURRENT = FIT_STATE, FIT_BEST, FIT_CURRENT
_ROW = "_row"  # the record's position in the driver's frame


class _MappingWithHead(nn.Module):
    """What DeepSpeed trains: the mapping and the head. The frozen LLM is deliberately not a submodule."""

    def __init__(self, mapping: nn.Module, head: nn.Module):
        super().__init__()
        self.mapping, self.head = mapping, head

    def forward(self, plm, sources: list[torch.Tensor], enc: dict, labels: torch.Tensor, task: str):
        from puma_ray.models.heads import task_loss
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


# ---- checkpoints: tensors in safetensors, the rest in JSON; nothing pickled, DeepSpeed's own (torch.save) files
# are never written or read (torch.load of them would unpickle whatever a shared storage path holds)
_CHECKPOINT_FILE = re.compile(rf"^({re.escape(_STATE)}|{re.escape(_BEST)}|{re.escape(_CURRENT)}|"
                              rf"{re.escape(FIT_OPTIMIZER_PREFIX)}\d+\.safetensors)$")


def _optimizer_file(rank: int) -> str:
    return f"{FIT_OPTIMIZER_PREFIX}{rank}.safetensors"


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (stage 0: the optimizer itself)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _save_moments(engine, path: str) -> None:
    """This rank's Adam moments and step counts (over its partition of the flat fp32 parameters)."""
    opt, tensors, steps = _base_optimizer(engine), {}, {}
    for g, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            st = opt.state.get(p) or {}
            for name in ("exp_avg", "exp_avg_sq"):
                if name in st:
                    tensors[f"{g}.{i}.{name}"] = st[name].detach().float().cpu().contiguous()
            if "step" in st:
                steps[f"{g}.{i}"] = float(st["step"])
    save_file(tensors, path, metadata={"steps": json.dumps(steps)})


def _load_moments(engine, path: str) -> None:
    opt = _base_optimizer(engine)
    with safe_open(path, "pt") as f:
        steps = json.loads(f.metadata()["steps"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for g, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            key = f"{g}.{i}"
            if key in steps and tensors[f"{key}.exp_avg"].shape == p.shape:
                opt.state[p] = {"step": torch.tensor(steps[key]),
                                **{n: tensors[f"{key}.{n}"].to(p.device, p.dtype) for n in ("exp_avg", "exp_avg_sq")}}


def _json_state(state: dict) -> dict:
    """A scheduler's state_dict as JSON (its lambdas are code, never saved: the fit rebuilds them)."""
    if "lr_lambdas" in state:  # LambdaLR: None per lambda, which its load_state_dict skips
        return {**state, "lr_lambdas": [None] * len(state["lr_lambdas"])}
    return dict(state)


def _read_checkpoint(folder: str) -> tuple[dict, dict, dict]:
    """(state, current weights, best weights) of one checkpoint folder, after check_checkpoint_folder."""
    check_checkpoint_folder(folder)
    with open(os.path.join(folder, _STATE)) as f:
        saved = json.load(f)
    return saved, load_file(os.path.join(folder, _CURRENT)), load_file(os.path.join(folder, _BEST))


def check_checkpoint_folder(folder: str, fs=None, files: re.Pattern = _CHECKPOINT_FILE, state: str = _STATE) -> None:
    """Only the files a fit writes (`files`; the prompt training has its own names), each parsing as what its
    name says (JSON; safetensors, whose header is JSON and whose data is raw tensors): anything else, a pickle
    above all, is refused with one line, never read; `state` must be there."""
    import fsspec
    fs = fs or fsspec.filesystem("file")
    names = [p[len(folder.rstrip("/")) + 1:] for p in fs.find(folder)]
    for name in names:
        if not files.match(name):
            raise CheckpointError(f"checkpoint {folder}: {name!r} is not a file this fit writes; only its safetensors "
                                  "and JSON files are read (nothing is unpickled), so this checkpoint is refused")
    for name in names:
        try:
            with fs.open(f"{folder.rstrip('/')}/{name}", "rb") as f:
                if name.endswith(".json"):
                    json.loads(f.read())
                else:  # the safetensors header (8-byte length, JSON) names dtypes and offsets: no tensor is read
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size)) if 0 < size < 100_000_000 else None
                    if not isinstance(header, dict):
                        raise ValueError("no safetensors header")
        except Exception as e:  # any parse failure of untrusted bytes is the same refusal
            kind = "JSON" if name.endswith(".json") else "safetensors"
            raise CheckpointError(f"checkpoint {folder}: {name} is not valid {kind} ({type(e).__name__})") from None
    if state not in names:
        raise CheckpointError(f"checkpoint {folder}: no {state} (incomplete checkpoint)")


def check_run_checkpoints(storage_path: str, run: str, storage: StorageOptions | None = None) -> int:
    """Every checkpoint a resumed run could restore (storage_path/run/checkpoint_*), checked before Ray Train
    starts: a bad one is one line in the driver instead of a worker failure retried max_failures times."""
    fs, root = filesystem(join(storage_path, run), storage)
    if not fs.exists(root):
        return 0
    folders = [e["name"] for e in fs.ls(root, detail=True)  # Ray's checkpoint_manager_snapshot.json is its own
               if e["type"] == "directory" and os.path.basename(e["name"].rstrip("/")).startswith("checkpoint_")]
    for folder in folders:
        check_checkpoint_folder(folder, fs)
    return len(folders)


def _save_weights(module: _MappingWithHead, path: str) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}, path)


def _worker_loop(cfg: dict) -> None:
    """One Train worker: the fit's epochs on training/loop.py's loop (as fit.fit_mapping runs them in process),
    with a DeepSpeed engine doing the step, this worker's shard of the records, a checkpoint + report per epoch."""
    import ray.train as rt
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg["use_gpu"] else "cpu")
    use_own_extensions_dir()  # a worker on another node: its environment's own JIT-op folder (tools/deepspeed_ops.py)
    import deepspeed

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
    plm = PromptedLM(backbone, TemplateConfig(**cfg["template"]), cfg["l"], cfg["item_texts"], m.prefix_cache_mib)
    fit: FitConfig = cfg["fit"]
    task, users = cfg["task"], pd.Index(cfg["users"])  # indexed once: every batch maps its users through it
    torch.manual_seed(fit.seed)  # as the in-process fit: the same dropout masks on the same batches
    # this worker's records, once, in the driver's order (_row): the fit's users are a few percent of all
    parts = list(rt.get_dataset_shard("train").iter_batches(batch_size=65_536, batch_format="pandas"))
    shard = pd.concat(parts).sort_values(_ROW) if parts else cfg["valid"].iloc[:0]
    train_set, valid_set = RecordSet.from_frame(shard, users), RecordSet.from_frame(cfg["valid"], users)
    module = _MappingWithHead(cfg["mapping"], cfg["head"])
    checkpoint, saved = rt.get_checkpoint(), None
    if checkpoint:  # the weights go in before DeepSpeed copies them into its fp32 partitions
        with checkpoint.as_directory() as d:
            saved, current, best = _read_checkpoint(d)
        module.load_state_dict(current)
    groups = adapter_param_groups(module.mapping, module.head, fit)
    optimizer = torch.optim.AdamW(groups) if cfg["optimizer"] == "torch_adamw" else None
    total_steps = fit.epochs * max(1, math.ceil(len(train_set) / fit.batch_size))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, model_parameters=None if optimizer else groups,
        config=_deepspeed_config(cfg), lr_scheduler=lambda opt: lr_schedule(opt, fit.schedule, total_steps))
    dtype = next(engine.module.parameters()).dtype
    tables = [torch.from_numpy(np.array(x, dtype=np.float32)) for x in cfg["inputs"]]  # copies: Ray's are read-only

    def sources(idx: torch.Tensor) -> list[torch.Tensor]:
        return [t[idx].to(device=device, dtype=dtype) for t in tables]

    def prompts_for(idx):
        return engine.module.mapping(*sources(idx))

    cost = Cost(flops_per_token=2.0 * (plm.backbone.identity.num_params or 0))
    flops_per_vector = getattr(module.mapping, "flops_per_vector", lambda: 0.0)()
    state = LoopState()
    if saved is not None:
        if saved["world_size"] == world:  # ZeRO partitions the moments per rank: another world size restarts them
            with checkpoint.as_directory() as d:
                _load_moments(engine, os.path.join(d, _optimizer_file(rank)))
        engine.lr_scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(_base_optimizer(engine).param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler's position, not its first step's rate
        state = LoopState.from_json(saved["loop"], best_state=best)
        state.resumed_from = state.epoch
        cost = Cost(**saved["cost"])
    order = epoch_orders(len(train_set), fit.seed)  # resuming at epoch e draws (and drops) epochs 0..e-1 first

    def step(batch: RecordSet) -> tuple[float, int]:
        enc = plm.encode(batch.item_ids, batch.histories)
        loss = engine(plm, sources(torch.from_numpy(batch.user_index)), enc,
                      torch.from_numpy(batch.labels).to(device), task)
        engine.backward(loss)
        engine.step()
        cost.extra_flops += 3 * flops_per_vector * len(batch) * plm.l  # adapter forward + backward
        return float(loss.item()), enc["tokens"]

    def save_and_report(epoch: int, state: LoopState) -> None:
        with tempfile.TemporaryDirectory() as d:
            _save_moments(engine, os.path.join(d, _optimizer_file(rank)))  # every rank: ZeRO partitions them
            if rank == 0:
                _save_weights(engine.module, os.path.join(d, _CURRENT))
                save_file({k: v.contiguous() for k, v in state.best_state.items()}, os.path.join(d, _BEST))
                with open(os.path.join(d, _STATE), "w") as f:
                    json.dump({"loop": state.to_json(), "cost": cost.state(), "world_size": world,
                               "scheduler": _json_state(engine.lr_scheduler.state_dict())}, f)
            entry = state.history[-1]
            rt.report({"epoch": epoch, get_task(task).primary: entry[f"valid_{get_task(task).primary}"],
                       "train_loss": entry["train_loss"]}, checkpoint=rt.Checkpoint.from_directory(d))
        if cfg.get("pid_dir"):  # after the report: a fault-injection test kills a worker with a checkpoint to go to
            with open(os.path.join(cfg["pid_dir"], f"rank{rank}.pid"), "w") as f:
                f.write(f"{os.getpid()} {epoch}")

    steps = EpochSteps(
        batches=lambda epoch: train_set.batches(fit.batch_size, order=order(epoch)), step=step,
        train_mode=engine.train,
        validate=lambda: evaluate(plm, engine.module.head, task, prompts_for, valid_set, fit.eval_batch_size, cost),
        snapshot=lambda: {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()})
    if not state.best_state:  # a fit that never validated keeps its start as the best so far
        state.best_state = steps.snapshot()
    # rank 0's epoch and progress lines reach the driver's console live (progress.py); the other ranks' are theirs
    say = sender(cfg["progress"]) if cfg.get("progress") is not None and rank == 0 else (lambda _: None)
    run_epochs(steps, task, fit.epochs, fit.patience, cost, backward=True, log=say, state=state,
               on_epoch=save_and_report, entry_extra={"workers": world}, log_prefix="  ")


def make_ray_fit(engine: EngineConfig, model: ModelConfig, storage_path: str, storage: StorageOptions | None = None,
                 run_name: str = "puma", pid_dir: str | None = None):
    """A function with fit.fit_mapping's signature that runs the fit on Ray Train + DeepSpeed."""

    def ray_fit(plm, task, mapping, inputs, users, train, valid, head, cfg: FitConfig, log=print,
                name="fit") -> FitResult:
        import ray
        from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from .session import ensure_ray
        ensure_ray(engine.address, engine.local_cpus)
        columns = [c for c in ("user_id", "item_id", "label", "history") if c in train.columns]
        # _row keeps the driver's order: a worker sorts its shard by it, then draws the same per-epoch orders as
        # the in-process fit (one worker: the very same batches; see tests/test_ray_engine.py's parity test)
        train_ds = ray.data.from_pandas(train[columns].reset_index(drop=True).assign(**{_ROW: np.arange(len(train))}))
        loop_cfg = {
            "model": model, "fingerprint": plm.backbone.identity.fingerprint, "template": vars(plm.template),
            "l": plm.l, "item_texts": plm.item_texts, "task": task, "users": users, "inputs": inputs,
            "mapping": mapping, "head": head, "fit": cfg, "valid": valid,
            "threads": engine.threads_per_worker, "use_gpu": engine.use_gpu, "zero_stage": engine.zero_stage,
            "precision": engine.precision, "optimizer": engine.optimizer, "pid_dir": pid_dir,
        }
        lines = LiveLines(log)  # the workers' epoch lines, on the console as they happen
        loop_cfg["progress"] = lines.queue
        # the run's folder is named by what makes the fit (settings, inputs, code version): only the same fit
        # resumes; a rerun with other settings or another adapter starts fresh in a folder of its own
        identity = fit_identity(plm, task, mapping, inputs, users, train, valid, head, cfg,
                                {"zero_stage": engine.zero_stage, "precision": engine.precision,
                                 "optimizer": engine.optimizer})
        run = f"{run_name}-{name}-{identity}"
        # a resumed run restores its latest checkpoint: every one of them is checked here first (one line, no pickle)
        had_checkpoints = check_run_checkpoints(storage_path, run, storage) > 0
        fs, path = pyarrow_filesystem(storage_path, storage)
        trainer = TorchTrainer(
            _worker_loop, train_loop_config=loop_cfg,
            scaling_config=ScalingConfig(num_workers=engine.num_workers, use_gpu=engine.use_gpu,
                                         resources_per_worker={"CPU": engine.cpus_per_worker}),
            run_config=RunConfig(name=run, storage_path=path, storage_filesystem=fs,
                                 failure_config=FailureConfig(max_failures=engine.max_failures)),
            datasets={"train": train_ds})
        start = time.perf_counter()
        try:
            with lines:
                result = trainer.fit()
        except Exception as e:  # a project error in a worker (bad input): the same one line as in process
            cause = user_error(e, PumaError)
            if cause is not None:
                raise type(cause)(str(cause)) from e
            raise
        wall = time.perf_counter() - start
        checkpoint: Checkpoint = result.checkpoint
        with checkpoint.as_directory() as d:
            with open(os.path.join(d, _STATE)) as f:
                saved = json.load(f)
            best = load_file(os.path.join(d, _BEST))
        state = LoopState.from_json(saved["loop"])
        if had_checkpoints and state.resumed_from is None:  # a finished fit rerun: nothing new ran or was saved
            state.resumed_from = state.epoch
        if lines.lost:  # the live lines stopped with their queue: the whole history, as the checkpoint holds it
            for h in state.history:
                log("  " + describe_epoch(h, get_task(task).primary))
        fitted = _MappingWithHead(copy.deepcopy(mapping), copy.deepcopy(head))
        fitted.load_state_dict(best)
        fitted.eval()
        # every worker counted its own shard and evaluated the validation records: the fit's totals are world x
        world, counted = saved["world_size"], Cost(**saved["cost"])
        # the workers' own clock counts epochs and validation: the rest of the wall is the start-up
        cost = Cost(wall_s=wall, startup_s=max(0.0, wall - counted.wall_s),
                    forward_records=counted.forward_records * world,
                    backward_records=counted.backward_records * world,
                    tokens_forward=counted.tokens_forward * world, tokens_backward=counted.tokens_backward * world,
                    flops_per_token=counted.flops_per_token, extra_flops=counted.extra_flops * world)
        return FitResult(fitted.mapping, fitted.head, state.history, state.best_epoch,
                         # keyed as the in-process fit's (the primary metric), plus where it resumed from
                         {get_task(task).primary: state.best, "best": state.best,
                          "resumed_from": state.resumed_from}, cost,
                         checkpoints={"folder": join(storage_path, run), "identity": identity,
                                      "resumed_from": state.resumed_from})

    return ray_fit
