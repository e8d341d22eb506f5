"""Eq. 1 on Ray Train (ray_layer/prompt_train.py): workers own their users' prompts and write their shards; the
driver writes the manifest. One worker = the in-process training; two = every user once, the same quality."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.timeout(1200), pytest.mark.usefixtures("_model_cache")]


@pytest.fixture(scope="module")
def eq1_data(tmp_path_factory, toy_dataset):
    from puma_ray.data import save_dataset
    from puma_ray.models.backbone import load_backbone
    folder = tmp_path_factory.mktemp("eq1")
    paths = save_dataset(toy_dataset, str(folder / "data"))
    return toy_dataset, paths, load_backbone("tiny:llama"), folder


def _train(eq1_data, path, workers, epochs=2, storage_path=None, run_name="eq1", pid_dir=None, max_failures=0):
    from puma_ray.config import EngineConfig, ModelConfig, PromptTrainConfig, TemplateConfig
    from puma_ray.ray_layer.prompt_train import train_store_on_ray
    from puma_ray.recipes.train_prompts import item_texts
    ds, paths, backbone, folder = eq1_data
    train = PromptTrainConfig(epochs=epochs, batch_size=32, lr=0.01, patience=5)
    engine = EngineConfig(num_workers=workers, cpus_per_worker=0.5, max_failures=max_failures)
    return train_store_on_ray(path, ModelConfig(name="tiny:llama"), backbone.identity.fingerprint,
                              backbone.identity, TemplateConfig(), item_texts(ds), ds.task, ds.users,
                              paths["records"], train, engine, storage_path or str(folder / "train"), run_name,
                              shard_rows=16, log=lambda m: None, pid_dir=pid_dir), train


def test_one_worker_is_the_in_process_training(local_ray, eq1_data):
    from puma_ray.artifacts.store import PromptStore
    from puma_ray.config import TemplateConfig
    from puma_ray.models.prompted_lm import PromptedLM
    from puma_ray.recipes.train_prompts import item_texts
    from puma_ray.training.prompts import train_prompts
    ds, _, backbone, folder = eq1_data
    out, train = _train(eq1_data, str(folder / "one"), 1, run_name="one")
    users = np.sort(ds.users.astype(str))
    want = train_prompts(PromptedLM(backbone, TemplateConfig(), 1, item_texts(ds)), ds.task, ds.split("train"),
                         ds.split("valid"), users, train, log=lambda m: None)
    ids, prompts = PromptStore.open(str(folder / "one")).read_all()
    np.testing.assert_array_equal(ids, users)
    np.testing.assert_allclose(prompts, want.prompts, atol=1e-5)
    assert out["valid"]["rmse"] == pytest.approx(want.valid["rmse"], abs=1e-5)
    assert [h["train_loss"] for h in out["history"]] == pytest.approx([h["train_loss"] for h in want.history],
                                                                      abs=1e-5)


@pytest.mark.slow  # two more trainings (~2.5 min); the killed-worker test below also runs two workers
def test_two_workers_write_every_user_once(local_ray, eq1_data):
    from puma_ray.artifacts.store import PromptStore
    ds, _, _, folder = eq1_data
    one, _ = _train(eq1_data, str(folder / "one-b"), 1, run_name="one-b")
    two, _ = _train(eq1_data, str(folder / "two"), 2, run_name="two")
    store = PromptStore.open(str(folder / "two"))
    ids, _ = store.read_all()  # refuses a duplicate or a count other than the manifest's
    np.testing.assert_array_equal(ids, np.sort(ds.users.astype(str)))
    assert {e["name"][:8] for e in store.manifest.shards} == {"rank0000", "rank0001"}  # each worker wrote its own
    assert not os.path.exists(folder / "two" / "_written")
    # different batches (each worker its users), the same data and schedule: within noise of one worker
    assert abs(two["valid"]["rmse"] - one["valid"]["rmse"]) < 0.05, (two["valid"], one["valid"])
    assert two["history"][-1]["workers"] == 2


def test_a_worker_killed_mid_training_resumes_and_the_store_verifies(local_ray, eq1_data, tmp_path):
    """SIGKILL one of two workers after its second epoch (the first epoch's checkpoint is registered by then):
    Ray Train restarts the group from a checkpoint, every epoch runs once, jobs/convert.py --verify accepts the
    store."""
    import subprocess
    import sys
    _, _, _, folder = eq1_data
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    killed = {}

    def kill_after_second_epoch():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            text = (pid_dir / "rank1.pid").read_text().split() if (pid_dir / "rank1.pid").exists() else []
            if len(text) == 2 and int(text[1]) >= 1:
                os.kill(int(text[0]), signal.SIGKILL)
                killed["pid"] = int(text[0])
            time.sleep(0.1)

    thread = threading.Thread(target=kill_after_second_epoch, daemon=True)
    thread.start()
    out, _ = _train(eq1_data, str(tmp_path / "store"), 2, epochs=4, storage_path=str(tmp_path / "train"),
                    run_name="killed", pid_dir=str(pid_dir), max_failures=2)
    thread.join(5)
    assert killed, "the worker was never killed"
    assert out["resumed_from"] is not None  # the retry restored a checkpoint instead of starting over
    assert [h["epoch"] for h in out["history"]] == [0, 1, 2, 3]  # every epoch once, none repeated
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    verify = subprocess.run([sys.executable, os.path.join(root, "jobs", "convert.py"), "--verify",
                             str(tmp_path / "store")], capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
