"""Eq. 1 on Ray Train: every user's prompt trained on the frozen model by N workers, each owning its users.

Worker r owns users[r::N] (sorted ids, round robin: balanced counts). It reads only its users' train and valid
records (a Parquet filter), holds only their prompt rows (never all-reduced, never gathered anywhere), and steps
them with SparseAdam as training/prompts.py does in process. The head is replicated: its gradients are averaged
over the workers every step (all-reduce), and a worker with fewer batches in an epoch takes empty steps so the
collectives line up. Validation merges every worker's partial metrics (metrics.partial_metrics), so early stopping
decides the same on all of them. Checkpoints each epoch hold, per rank, its users' current and best prompt rows
and their Adam moments, and on rank 0 the head (current, best, moments) and the loop state: a killed worker's
retry resumes from them (same N). At the end each worker writes its users' store shards itself and a record of
them; the driver checks that every user is in exactly one shard, writes the head and the manifest last.
With one worker the batches, initialisation and steps are the in-process ones.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from puma_ray.artifacts.store import SHARD_DIR, PromptStore, StoreError, StoreWriter, check_finite, encode_shard
from puma_ray.artifacts.store_index import sorted_member
from puma_ray.config import EngineConfig, ModelConfig, PromptTrainConfig, TemplateConfig
from puma_ray.errors import CheckpointError, PumaError
from puma_ray.fs import StorageOptions, filesystem, join, pyarrow_filesystem, stamp, write_file
from puma_ray.metrics import merge_partial_metrics, partial_metrics
from puma_ray.tasks import get_task
from puma_ray.training.cost import Cost
from puma_ray.training.loop import EpochSteps, LoopState, describe_epoch, run_epochs
from puma_ray.training.run_identity import RunIdentity

from .compat import user_error
from .progress import LiveLines, sender
from .train import check_checkpoint_folder

STATE, HEAD_FILE = "prompt_state.json", "prompt_head.safetensors"
RECORDS_DIR = "_written"  # in the store folder: each rank's shard entries, read by the driver before the manifest
_FILES = re.compile(r"^(prompt_state\.json|prompt_head\.safetensors|prompts_rank\d+\.safetensors)$")


def _rank_file(rank: int) -> str:
    return f"prompts_rank{rank}.safetensors"


def _check_checkpoint(folder: str) -> None:
    """The fit's checkpoint check (train.check_checkpoint_folder: names, then every file parsed) on this
    training's file names."""
    check_checkpoint_folder(folder, files=_FILES, state=STATE)


def _adam_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p) or {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                out[f"{prefix}.{i}.{key}"] = st[key].detach().to_dense().float().cpu().contiguous()
        if "step" in st:
            out[f"{prefix}.{i}.step"] = torch.tensor([float(st["step"])])
    return out


def _load_adam(opt: torch.optim.Optimizer, tensors: dict, prefix: str) -> None:
    for i, p in enumerate(opt.param_groups[0]["params"]):
        if f"{prefix}.{i}.exp_avg" in tensors:
            opt.state[p] = {"step": torch.tensor(float(tensors[f"{prefix}.{i}.step"][0])),
                            "exp_avg": tensors[f"{prefix}.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"{prefix}.{i}.exp_avg_sq"].to(p.device)}


def _worker(cfg: dict) -> None:
    import ray.train as rt
    import torch.distributed as dist

    from puma_ray.data.parquet_reads import read_user_records
    from puma_ray.models.backbone import load_backbone
    from puma_ray.models.heads import make_head, task_loss
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.training.evaluate import predict
    from puma_ray.training.records import RecordSet, forward_batch
    torch.set_num_threads(cfg["threads"])
    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    m: ModelConfig = cfg["model"]
    train: PromptTrainConfig = cfg["train"]
    task = cfg["task"]
    backbone = load_backbone(m.name, m.revision, m.dtype, m.seed)
    if backbone.identity.fingerprint != cfg["fingerprint"]:
        raise RuntimeError(f"worker {rank} loaded {backbone.identity.describe()}, not the driver's model")
    # everything on the worker's device (its GPU with engine.use_gpu): the collectives below then run on it too
    device = rt.torch.get_device() if cfg.get("use_gpu") else torch.device("cpu")
    backbone.model.to(device)
    plm = PromptedLM(backbone, TemplateConfig(**cfg["template"]), train.prompt_length, cfg["item_texts"],
                     m.prefix_cache_mib)
    users = np.asarray(cfg["users"], dtype=str)[rank::world]  # this worker's users: their rows live only here
    records = read_user_records(cfg["records"], users, ["train", "valid"], cfg["storage"])
    train_set = RecordSet.from_frame(records[records["split"] == "train"], users)
    valid_set = RecordSet.from_frame(records[records["split"] == "valid"], users)
    del records
    n, l, d, scale = len(users), train.prompt_length, plm.d, plm.embed_rms
    torch.manual_seed(train.seed)  # as train_prompts: the table first, then the head
    rng = np.random.default_rng(train.seed + rank)  # rank 0 of 1: the in-process generator
    table = torch.nn.Embedding(n, l * d, sparse=True)
    with torch.no_grad():
        table.weight.uniform_(-train.init_scale * 3 ** 0.5, train.init_scale * 3 ** 0.5)
        if cfg.get("init_store"):  # a warm start (repair, polish): this worker's users' rows of that store
            from puma_ray.artifacts.store_index import StoreIndex
            rows = StoreIndex(PromptStore.open(cfg["init_store"], cfg["storage"])).rows(users)
            table.weight.copy_(torch.from_numpy(rows.reshape(n, l * d)) / scale)
    head = make_head(task)
    if cfg.get("head_state") is not None:  # the warm start's head (every worker the same: no broadcast needed)
        head.load_state_dict(cfg["head_state"])
    train_head = cfg.get("train_head", True)
    table.to(device)  # after both are drawn on the CPU: the same start as in process, whatever the device
    head.to(device)
    for p in head.parameters():  # one head on every worker: rank 0's start
        dist.broadcast(p.data, 0)
    opt_prompts = torch.optim.SparseAdam(table.parameters(), lr=train.lr)
    opt_head = torch.optim.Adam(head.parameters(), lr=train.head_lr)
    cost = Cost(flops_per_token=2.0 * (backbone.identity.num_params or 0))
    state = LoopState()
    checkpoint = rt.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            _check_checkpoint(folder)
            with open(os.path.join(folder, STATE)) as f:
                saved = json.load(f)
            if saved["world_size"] != world:
                raise CheckpointError(f"checkpoint of {saved['world_size']} workers: resume with "
                                      f"engine.num_workers {saved['world_size']} (each owns its users' prompts)")
            mine, heads = load_file(os.path.join(folder, _rank_file(rank))), load_file(os.path.join(folder, HEAD_FILE))
        with torch.no_grad():
            table.weight.copy_(mine["current"])
        head.load_state_dict({k[len("current."):]: v for k, v in heads.items() if k.startswith("current.")})
        mine["best"] = mine["best"].to(device)
        _load_adam(opt_prompts, mine, "adam")
        _load_adam(opt_head, heads, "adam")
        state = LoopState.from_json(saved["loop"], best_state={
            "table": mine["best"], "head": {k[len("best."):]: v for k, v in heads.items() if k.startswith("best.")}})
        state.resumed_from = state.epoch
        cost = Cost(**saved["cost"])
        rng = np.random.default_rng(train.seed + rank)
        for _ in range(state.epoch + 1):  # the epochs done drew their samples and orders: draw them again
            list(train_set.sample(train.max_train_records, rng).batches(train.batch_size, rng))

    def prompts_for(idx: torch.Tensor) -> torch.Tensor:
        return table(idx.to(device)).view(-1, l, d) * scale

    def step(batch) -> tuple[float, int]:
        opt_prompts.zero_grad()
        opt_head.zero_grad()
        loss_value, tokens = 0.0, 0
        if len(batch):
            logits, tokens = forward_batch(plm, prompts_for, batch)
            loss, _ = task_loss(task, head, logits, torch.from_numpy(batch.labels).to(device))
            loss.backward()
            loss_value = loss.item()
        for p in head.parameters():  # the head's gradient: the mean over the workers (an empty step adds zero)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world
        if len(batch):
            opt_prompts.step()
            with torch.no_grad():
                rows = torch.from_numpy(np.unique(batch.user_index)).to(device)
                table.weight[rows] = table.weight[rows].clamp(-train.clip, train.clip)
        if train_head:  # a frozen head (a repair: shared with users not trained) takes no step
            opt_head.step()
        return loss_value, tokens

    def batches(epoch: int):
        mine = list(train_set.sample(train.max_train_records, rng).batches(train.batch_size, rng))
        steps = torch.tensor([len(mine)], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        return mine + [train_set.subset(np.zeros(0, np.int64))] * (int(steps) - len(mine))

    def validate() -> dict:
        start = time.perf_counter()
        pred = predict(plm, head, task, prompts_for, valid_set, train.eval_batch_size, cost)
        parts = [None] * world
        dist.all_gather_object(parts, partial_metrics(task, valid_set.user_ids, valid_set.labels, pred))
        cost.wall_s += time.perf_counter() - start
        return merge_partial_metrics(task, [p for p in parts if p["records"]])

    def on_epoch(epoch: int, state: LoopState) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_file({"current": table.weight.detach().cpu().contiguous(),
                       "best": state.best_state["table"].cpu().contiguous(),
                       **_adam_tensors(opt_prompts, "adam")}, os.path.join(folder, _rank_file(rank)))
            if rank == 0:
                save_file({**{f"current.{k}": v.cpu().contiguous() for k, v in head.state_dict().items()},
                           **{f"best.{k}": v.cpu().contiguous() for k, v in state.best_state["head"].items()},
                           **_adam_tensors(opt_head, "adam")}, os.path.join(folder, HEAD_FILE))
                with open(os.path.join(folder, STATE), "w") as f:
                    json.dump({"loop": state.to_json(), "cost": cost.state(), "world_size": world}, f)
            entry = state.history[-1]
            rt.report({"epoch": epoch, "train_loss": entry["train_loss"]},
                      checkpoint=rt.Checkpoint.from_directory(folder))
        if cfg.get("pid_dir"):  # after the report: a fault-injection test kills a worker with a checkpoint to go to
            with open(os.path.join(cfg["pid_dir"], f"rank{rank}.pid"), "w") as f:
                f.write(f"{os.getpid()} {epoch}")

    steps = EpochSteps(batches=batches, step=step, train_mode=head.train, validate=validate,
                       snapshot=lambda: {"table": table.weight.detach().clone(),
                                         "head": {k: v.clone() for k, v in head.state_dict().items()}})
    if not state.best_state and cfg.get("init_store"):  # the warm start is a candidate: epochs must beat it
        head.eval()
        state.best, state.best_epoch, state.best_state = validate()[get_task(task).primary], -1, steps.snapshot()
    if not state.best_state:
        state.best_state = steps.snapshot()
    say = sender(cfg["progress"]) if cfg.get("progress") is not None and rank == 0 else (lambda _: None)
    state = run_epochs(steps, task, train.epochs, train.patience, cost, backward=True, log=say, state=state,
                       on_epoch=on_epoch, entry_extra={"workers": world}, log_prefix="  ")
    # this worker's users → its own shards of the store (the best epoch's rows, at the embedding scale)
    prompts = (state.best_state["table"].reshape(n, l, d) * scale).cpu().numpy().astype(np.float32)
    fs, root = filesystem(cfg["store"], cfg["storage"])
    written = []
    for k, start in enumerate(range(0, n, cfg["shard_rows"])):
        ids, rows = users[start:start + cfg["shard_rows"]], prompts[start:start + cfg["shard_rows"]]
        check_finite(ids, rows, f"store {cfg['store']}")  # here: the driver reads these shards' ids, not prompts
        data, sha = encode_shard(ids, rows)
        name = f"rank{rank:04d}-{k:05d}.parquet"
        write_file(fs, join(root, SHARD_DIR, name), data)
        written.append({"name": name, "rows": int(len(ids)), "sha256": sha})
    write_file(fs, join(root, RECORDS_DIR, f"rank{rank:04d}.json"), json.dumps(
        {"rank": rank, "world": world, "shards": written, "cost": cost.state()}).encode())


def train_store_on_ray(store_path: str, model: ModelConfig, fingerprint: str, identity, template: TemplateConfig,
                       item_texts: dict, task: str, users: np.ndarray, records_path: str, train: PromptTrainConfig,
                       engine: EngineConfig, storage_path: str, run_name: str, *, shard_rows: int = 65_536,
                       storage: StorageOptions | None = None, overwrite: bool = False, lineage: dict | None = None,
                       provenance: dict | None = None, log=print, pid_dir: str | None = None,
                       init_store: str | None = None, head_state: dict | None = None,
                       train_head: bool = True) -> dict:
    """Trains `users`' prompts on Ray Train (engine.num_workers workers) into the store at `store_path`; returns
    {"history", "best_epoch", "valid", "cost", "manifest"}. The driver holds the users' ids, never a prompt.
    A warm start (repair, polish): `init_store` holds the users' starting prompts (each worker reads its users'
    rows), `head_state` the starting head, `train_head` False keeps it; the start is validated first and kept
    unless an epoch beats it, as training/prompts.train_prompts does in process."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .session import ensure_ray
    ensure_ray(engine.address, engine.local_cpus)
    if train.shared:
        raise PumaError("train.shared (one prompt for everyone) is not trained on Ray; run it in process")
    users = np.sort(np.asarray(users, dtype=str))
    # the writer first: it refuses an existing store unless overwrite, and clears old shards before any worker
    writer = StoreWriter(store_path, identity, train.prompt_length, vars(template), task, shard_rows=shard_rows,
                         storage=storage, overwrite=overwrite, lineage=lineage, provenance=provenance)
    fs, root = filesystem(store_path, storage)
    if fs.exists(join(root, RECORDS_DIR)):
        fs.rm(join(root, RECORDS_DIR), recursive=True)  # our own records of an earlier, unfinished run
    fs.makedirs(join(root, RECORDS_DIR), exist_ok=True)
    lines = LiveLines(log)
    loop_cfg = {"model": model, "fingerprint": fingerprint, "template": vars(template), "item_texts": item_texts,
                "task": task, "users": users, "records": records_path, "train": train, "store": store_path,
                "shard_rows": shard_rows, "storage": storage, "threads": engine.threads_per_worker,
                "progress": lines.queue, "pid_dir": pid_dir, "use_gpu": engine.use_gpu, "init_store": init_store,
                "head_state": head_state, "train_head": train_head}
    # checkpoints in a folder named by what makes this training: another config, model or records file is
    # another run that starts fresh, never a resume of this one's prompts
    ident = (RunIdentity("prompt-train").add("train", train).add("target", fingerprint).add("task", task)
             .add("template", vars(template)).add("records", stamp(records_path, storage))
             .add("item_texts", sorted((str(k), str(v)) for k, v in item_texts.items())).add_array("users", users))
    if init_store is not None:  # another start is another run (a cold start's identity stays as it was)
        ident.add("warm_start", {"store": init_store, "manifest": stamp(join(init_store, "manifest.json"), storage),
                                 "train_head": train_head})
    run_name = f"{run_name}-{ident.hexdigest()}"
    afs, apath = pyarrow_filesystem(storage_path, storage)
    trainer = TorchTrainer(
        _worker, train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=engine.num_workers, use_gpu=engine.use_gpu,
                                     resources_per_worker={"CPU": engine.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=apath, storage_filesystem=afs,
                             failure_config=FailureConfig(max_failures=engine.max_failures)))
    start = time.perf_counter()
    try:
        with lines:
            result = trainer.fit()
    except Exception as e:
        cause = user_error(e, PumaError)
        if cause is not None:
            raise type(cause)(str(cause)) from e
        raise
    wall = time.perf_counter() - start
    with result.checkpoint.as_directory() as folder:
        _check_checkpoint(folder)
        with open(os.path.join(folder, STATE)) as f:
            saved = json.load(f)
        heads = load_file(os.path.join(folder, HEAD_FILE))
    state = LoopState.from_json(saved["loop"])
    if lines.lost:
        for h in state.history:
            log("  " + describe_epoch(h, get_task(task).primary))
    # every worker's shards, each user exactly once, then the head and the manifest (last)
    counted = Cost(flops_per_token=saved["cost"]["flops_per_token"])
    worked = 0.0  # the slowest worker's own clock (epochs + validation): the rest of the wall is the start-up
    world = saved["world_size"]
    # ids only: each worker checked its rows before writing, the checksums are checked by every later reader, and
    # the driver never streams the store's prompts (a 10M-user store of a 1B model is ~80 GB)
    reader, written = PromptStore(writer.path, _pending_manifest(writer), writer.fs, writer.root), []
    for rank in range(world):
        with fs.open(join(root, RECORDS_DIR, f"rank{rank:04d}.json"), "r") as f:
            record = json.load(f)
        for entry in record["shards"]:
            ids = reader.read_user_ids(entry)
            writer.add_shard(entry, ids)
            written.append(ids.astype(str))
        c = Cost(**record["cost"])
        worked = max(worked, c.wall_s)
        for key in ("forward_records", "backward_records", "tokens_forward", "tokens_backward"):
            setattr(counted, key, getattr(counted, key) + getattr(c, key))
    written = np.sort(np.concatenate(written)) if written else np.array([], dtype=str)  # no duplicate: add_shard
    if not np.array_equal(written, users):
        missing = users[~sorted_member(written, users)]
        raise StoreError(f"store {store_path}: the workers wrote {len(written)} of {len(users)} users "
                         f"(first missing: {[str(u) for u in missing[:1]]})")
    from puma_ray.models.heads import head_config, make_head
    head = make_head(task)
    head.load_state_dict({k[len("best."):]: v for k, v in heads.items() if k.startswith("best.")})
    writer.write_head(head.state_dict(), head_config(task, head))
    manifest = writer.close()
    fs.rm(join(root, RECORDS_DIR), recursive=True)
    counted.wall_s, counted.startup_s = wall, max(0.0, wall - worked)
    return {"history": state.history, "best_epoch": state.best_epoch, "resumed_from": state.resumed_from,
            "checkpoints": {"folder": join(storage_path, run_name), "resumed_from": state.resumed_from},
            "valid": {get_task(task).primary: state.best}, "cost": counted, "manifest": manifest, "head": head}


def _pending_manifest(writer: StoreWriter):
    from dataclasses import asdict

    from puma_ray.artifacts.store import Manifest
    return Manifest(model=asdict(writer.model), prompt_length=writer.l, hidden_size=writer.model.hidden_size,
                    template=writer.template, task=writer.task, num_users=0, shards=[])

