"""Session-wide test environment and shared fixtures: tiny models, a loopback S3 server, a toy rating dataset."""
from __future__ import annotations

import logging
import os
import socket

import numpy as np
import pandas as pd
import pytest

# Set before transformers / huggingface_hub / deepspeed are imported by any test module: several of these are read
# once at import time. Fake AWS credentials keep every S3 call away from real AWS.
_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_ACCELERATOR": "cpu",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
os.environ.update(_ENV)
# DeepSpeed's JIT op (the CPU comm op) lies in this environment's own folder (puma_ray/tools/deepspeed_ops.py),
# built by scripts/setup.sh: a shared folder made worktrees with their own venvs rebuild it in turn in fits' start-ups
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.pop("AWS_ENDPOINT_URL", None)  # an inherited endpoint would redirect every s3:// path of the suite
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Tiny models are built once per session into a fresh folder (never the user's ~/.cache)."""
    folder = str(tmp_path_factory.mktemp("models"))
    old = os.environ.get("PUMA_MODEL_CACHE")
    os.environ["PUMA_MODEL_CACHE"] = folder
    yield folder
    if old is None:
        os.environ.pop("PUMA_MODEL_CACHE", None)
    else:
        os.environ["PUMA_MODEL_CACHE"] = old


@pytest.fixture
def tiny_model(_model_cache):
    """tiny_model(family, seed=0) -> the folder of that tiny random model (built on first use)."""
    from puma_ray.models.tiny import ensure_tiny_model

    def make(family: str, seed: int = 0) -> str:
        return ensure_tiny_model(family, seed=seed, root=_model_cache)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on 1 intra-op thread for one module, then back to what it was (the suite leaves threads alone).

    Measured here: a tiny model's forward took 0.46 s on 2 threads while other work shared the 2 cores, 0.004 s on
    one (OpenMP threads spinning against each other), which is the difference between a 30 s and a 5 s module.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- object storage
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback (a real HTTP endpoint) with one bucket; stopped at the end of the session."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    info = {"endpoint_url": endpoint, "bucket": "puma-test", "key": "testing", "secret": "testing"}
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=info["bucket"])
        yield info
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- data
GENRES = ["drama", "comedy", "action", "horror", "romance", "thriller"]


def make_toy_dataset(n_users: int = 40, records_per_user: int = 20, n_items: int = 30, seed: int = 0):
    """A small rating dataset with per-user structure: each user has a preferred rating level (+ noise)."""
    from puma_ray.data.records import Dataset, chronological_split, validate

    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [f"i{j:02d}" for j in range(n_items)],
                          "text": [f"Item {j}: {GENRES[j % len(GENRES)]}" for j in range(n_items)]})
    rows = []
    for u in range(n_users):
        level = 1 + (u % 5)  # users spread evenly over the five rating levels
        chosen = rng.choice(n_items, records_per_user, replace=False)
        noise = rng.choice([-1, 0, 0, 0, 1], records_per_user)
        labels = np.clip(level + noise, 1, 5)
        for k, (j, y) in enumerate(zip(chosen, labels)):
            rows.append({"user_id": f"u{u:03d}", "item_id": f"i{j:02d}", "label": float(y),
                         "timestamp": 1_000_000 + 100 * u + k})
    records = pd.DataFrame(rows).astype({"label": "float32", "timestamp": "int64"})
    records = chronological_split(records, valid_frac=0.1, test_frac=0.1)
    return validate(Dataset(records, items, "rating", "toy", {"generator": "tests.conftest", "seed": seed}))


@pytest.fixture(scope="session")
def toy_dataset():
    """40 users x 20 records over 30 items; treat as read-only (it is shared by the session)."""
    return make_toy_dataset()


# ---------------------------------------------------------------------------------------------- stores
@pytest.fixture
def store_inputs():
    """What a store is made of, without any model: an identity, 11 users' prompts (l=2, d=8), a rating head."""
    from types import SimpleNamespace

    from puma_ray.artifacts.store import ModelIdentity
    from puma_ray.config import TemplateConfig, to_dict
    from puma_ray.models.heads import RatingHead, head_config

    rng = np.random.default_rng(1)
    n, l, d = 11, 2, 8
    identity = ModelIdentity(name="tiny:llama", family="llama", hidden_size=d, fingerprint="ab" * 32,
                             revision=None, num_layers=2, num_params=1234)
    user_ids = np.array([f"u{i:03d}" for i in rng.permutation(n)])  # deliberately not sorted
    prompts = rng.normal(0, 0.02, size=(n, l, d)).astype(np.float32)
    head = RatingHead()
    return SimpleNamespace(identity=identity, user_ids=user_ids, prompts=prompts, l=l, d=d,
                           head_state=head.state_dict(), head_config=head_config("rating", head),
                           template=to_dict(TemplateConfig()), task="rating",
                           lineage={"kind": "trained", "data": "toy", "trainer": "tests"},
                           provenance={"note": "made by tests"})


# ---------------------------------------------------------------------------------------------- Ray + jobs
@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with this machine's 2 CPUs for one test module, shut down after it."""
    import ray

    from puma_ray.ray_layer import ensure_ray
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def load_job():
    """load_job("sweep") -> the module jobs/sweep.py (jobs/ is a folder of scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_job", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


# ---------------------------------------------------------------------------------------------- Parquet data + a store
SHARD_ROWS = 64  # several shards even for a few hundred users: the shard pass and StoreIndex cross shards


def write_random_store(path: str, users: np.ndarray, model: str = "tiny:llama", seed: int = 0,
                       shard_rows: int = SHARD_ROWS) -> str:
    """Random prompts at the model's embedding scale, two clusters of users apart (K-means has something to
    find), bound to the model's identity; users written in a shuffled order (shards are not id ranges)."""
    from puma_ray.artifacts.store import StoreWriter
    from puma_ray.config import TemplateConfig, to_dict
    from puma_ray.models.backbone import embedding_rms, load_backbone
    from puma_ray.models.heads import RatingHead, head_config
    backbone = load_backbone(model)
    d, rms = backbone.identity.hidden_size, embedding_rms(backbone.model)
    rng = np.random.default_rng(seed)
    prompts = (rng.standard_normal((len(users), 1, d)) * rms).astype(np.float32)
    prompts[: len(users) // 2] += 2 * rms
    order = rng.permutation(len(users))
    writer = StoreWriter(path, backbone.identity, 1, to_dict(TemplateConfig()), "rating", shard_rows=shard_rows,
                         lineage={"kind": "trained", "data": "toy", "note": "random"})
    for start in range(0, len(users), shard_rows):
        rows = order[start:start + shard_rows]
        writer.write_shard(users[rows], prompts[rows])
    head = RatingHead()
    writer.write_head(head.state_dict(), head_config("rating", head))
    writer.close()
    return path


@pytest.fixture(scope="module")
def lean_data(tmp_path_factory):
    """240 toy users as parquet files + a tiny:llama source store of them."""
    from puma_ray.data import save_dataset
    folder = tmp_path_factory.mktemp("lean")
    ds = make_toy_dataset(n_users=240, records_per_user=12)
    paths = save_dataset(ds, str(folder / "data"))
    store = write_random_store(str(folder / "source-store"), np.sort(ds.users.astype(str)))
    return ds, paths, store, folder


def lean_config(lean_data, output: str, change: dict | None = None):
    """A migrate config over lean_data for the Ray executor (engine.driver lean): what it can run, small."""
    from puma_ray.config import from_dict
    from puma_ray.recipes.migration import MigrateJobConfig
    _, paths, store, _ = lean_data
    raw = {"sources": [{"store": store, "model": {"name": "tiny:llama"}}], "target": {"name": "tiny:qwen2"},
           "data": {"name": "parquet", "paths": paths},
           "selection": {"strategy": "kmeans_variance", "k": 4, "budget": 30, "valid_users": 20,
                         "kmeans_sample": 100},
           "fit": {"epochs": 1, "batch_size": 32, "lr": 0.01, "patience": 1},
           "baselines": {"source": True, "random_init": False, "linear": True, "full_retrain": False,
                         "fits_on": "local"},
           "store": {"shard_rows": SHARD_ROWS}, "convert": {"actors": 1, "progress": False},
           "engine": {"kind": "ray", "num_workers": 1, "driver": "lean", "actors": 2}}
    for section, values in (change or {}).items():
        raw[section] = {**raw[section], **values}
    return from_dict(MigrateJobConfig, raw, "test")
