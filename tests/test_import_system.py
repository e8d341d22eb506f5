"""Bring your own 1+N system: a store trained here goes out in open formats and comes back equal; a system built
without this package's writer imports and verifies; every wrong input is one line, exit 2, nothing written."""
from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from puma_ray.artifacts.store import PromptStore
from puma_ray.artifacts.verify import verify_store
from puma_ray.data import save_dataset
from puma_ray.fs import StorageOptions, filesystem
from puma_ray.importing import ImportConfig, export_open, import_system

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(toy_dataset, tmp_path_factory, load_job):
    """A store trained by jobs/train_prompts.py (1 epoch, tiny stablelm) and the logs it was trained on."""
    root = tmp_path_factory.mktemp("trained")
    paths = save_dataset(toy_dataset, str(root / "data"))
    rc = load_job("train_prompts").main([
        "--output", str(root / "run"), "model.name=tiny:stablelm", "model.foundation=null", "data.name=parquet",
        f"data.paths.records={paths['records']}", f"data.paths.items={paths['items']}", "threads=1",
        "train.epochs=1", "train.batch_size=64"])
    assert rc == 0
    return str(root / "run" / "store"), paths


def _with_logs(folder, paths, **changes) -> None:
    """system.json of an exported folder, pointed at copies of the logs (and any other change)."""
    shutil.copy(paths["records"], folder / "records.parquet")
    shutil.copy(paths["items"], folder / "items.parquet")
    system = json.loads((folder / "system.json").read_text())
    system.update(records="records.parquet", items="items.parquet", **changes)
    (folder / "system.json").write_text(json.dumps(system))


def _same_store(a: str, b: str) -> None:
    sa, sb = PromptStore.open(a), PromptStore.open(b)
    (ia, pa), (ib, pb) = sa.read_all(), sb.read_all()
    assert list(ia) == list(ib)
    np.testing.assert_array_equal(pa, pb)
    assert sa.identity.fingerprint == sb.identity.fingerprint
    (ha, ca), (hb, cb) = sa.read_head(), sb.read_head()
    assert ca == cb and all(torch.equal(ha[k], hb[k]) for k in ha)
    assert sb.manifest.lineage["kind"] == "imported" and sa.manifest.template == sb.manifest.template


def test_round_trip_parquet_and_peft(trained, tmp_path):
    store, paths = trained
    out = tmp_path / "open"
    system = export_open(store, str(out), peft=True)
    assert system["format"] == "puma_ray.system/1" and (out / "prompts_peft").is_dir()
    _with_logs(out, paths)
    import_system(ImportConfig(str(out), str(tmp_path / "from_parquet")), log=lambda *_: None)
    _same_store(store, str(tmp_path / "from_parquet"))
    _with_logs(out, paths, prompts=system["prompts_peft"])  # the same system, its prompts as PEFT folders
    import_system(ImportConfig(str(out), str(tmp_path / "from_peft")), log=lambda *_: None)
    _same_store(store, str(tmp_path / "from_peft"))
    assert verify_store(str(tmp_path / "from_peft"), model="tiny:stablelm")["users"] == 40


def _foreign_system(folder, toy_dataset, tiny_model, l=2, fmt="npy"):
    """A system made without this package's writer: numpy prompts + id list, a plain-torch head, template text,
    CSV logs. Prompts sit at the model's embedding scale (as trained prompts start)."""
    from transformers import AutoModelForCausalLM
    model_dir = tiny_model("llama")
    emb = AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight
    scale = float(emb.detach().pow(2).mean().sqrt())
    folder.mkdir(parents=True, exist_ok=True)
    users = sorted(toy_dataset.records["user_id"].unique())
    prompts = np.random.default_rng(0).normal(0, scale, (len(users), l, emb.shape[1])).astype(np.float32)
    np.save(folder / "prompts.npy", prompts)
    (folder / "user_ids.json").write_text(json.dumps(users))
    head = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    save_file({"fc1.w": head[0].weight.detach(), "fc1.b": head[0].bias.detach(), "out.w": head[2].weight.detach(),
               "out.b": head[2].bias.detach()}, str(folder / "head.safetensors"))
    (folder / "head.json").write_text(json.dumps({"format": "puma_ray.head/1", "task": "rating", "kind": "mlp",
                                                  "layers": [{"weight": "fc1.w", "bias": "fc1.b"},
                                                             {"weight": "out.w", "bias": "out.b"}]}))
    toy_dataset.records.drop(columns=["split"]).to_csv(folder / "records.csv", index=False)
    toy_dataset.items.to_csv(folder / "items.csv", index=False)
    system = {"format": "puma_ray.system/1", "task": "rating", "model": {"name": model_dir},
              "prompts": {"kind": "npy", "path": "prompts.npy", "user_ids": "user_ids.json", "prompt_length": l},
              "template": {"text": "The user <UserID> rated <ItemTitle> as", "labels": ["1", "2", "3", "4", "5"]},
              "readout": {"weights": "head.safetensors", "layers": "head.json"},
              "records": "records.csv", "items": "items.csv"}
    (folder / "system.json").write_text(json.dumps(system))
    return system, prompts, users, head


def test_foreign_system_imports_and_verifies(toy_dataset, tiny_model, tmp_path, load_job, capsys):
    _, prompts, users, head = _foreign_system(tmp_path / "sys", toy_dataset, tiny_model)
    rc = load_job("import_system").main(["--system", str(tmp_path / "sys"), "--output", str(tmp_path / "store")])
    assert rc == 0, capsys.readouterr().err
    store = PromptStore.open(str(tmp_path / "store"))
    ids, got = store.read_all()
    assert list(ids) == users and np.array_equal(got, prompts)
    state, config = store.read_head()
    assert config["sizes"] == [5, 8, 1] and torch.equal(state["net.2.weight"], head[2].weight.detach())
    assert verify_store(str(tmp_path / "store"), model=tiny_model("llama"))["users"] == len(users)


def _break(name):
    """Each wrong input: a change to the foreign system's folder, and a word the one error line must hold."""
    def npy(f, change):
        np.save(f / "prompts.npy", change(np.load(f / "prompts.npy")))

    def system(f, change):
        s = json.loads((f / "system.json").read_text())
        change(s)
        (f / "system.json").write_text(json.dumps(s))

    def nan_row(p):
        p[3, 0, 0] = np.nan
        return p

    def ids(f, change):
        (f / "user_ids.json").write_text(json.dumps(change(json.loads((f / "user_ids.json").read_text()))))

    def records(f, change):
        change(pd.read_csv(f / "records.csv", dtype={"user_id": str, "item_id": str})).to_csv(
            f / "records.csv", index=False)
    return {
        "width": (lambda f: npy(f, lambda p: p[:, :, :-1]), "hidden size"),
        "length": (lambda f: npy(f, lambda p: np.concatenate([p, p[:, :1]], 1)), "prompt_length"),
        "nan_row": (lambda f: npy(f, nan_row), "non-finite prompt for user 'u003'"),
        "out_of_scale": (lambda f: npy(f, lambda p: p * np.where(np.arange(len(p)) == 5, 1e4, 1)[:, None, None]
                                       .astype(np.float32)), "user 'u005'"),
        "duplicate_user": (lambda f: ids(f, lambda u: u[:-1] + [u[0]]), "more than one prompt"),
        "no_slot": (lambda f: system(f, lambda s: s["template"].update(text="Rate <ItemTitle> as")), "<UserID>"),
        "glued_slot": (lambda f: system(f, lambda s: s["template"].update(text="The UserID rated <ItemTitle> as",
                                                                          user_placeholder="ID")),
                       "merges the user slot"),
        "head_shape": (lambda f: system(f, lambda s: s["readout"].update(layers="bad.json"))
                       or (f / "bad.json").write_text(json.dumps({
                           "format": "puma_ray.head/1", "task": "rating", "kind": "mlp",
                           "layers": [{"weight": "out.w", "bias": "out.b"}]})), "layer 0"),
        "logs_user_without_prompt": (lambda f: ids(f, lambda u: u[:-1]) or npy(f, lambda p: p[:-1]),
                                     "has records but no prompt"),
        "prompt_without_logs": (lambda f: records(f, lambda r: r[r["user_id"] != "u000"]),
                                "has a prompt but no records"),
        "path_escape": (lambda f: system(f, lambda s: s["prompts"].update(path="../prompts.npy")),
                        "not a plain file name"),
    }[name]


@pytest.mark.parametrize("case", ["width", "length", "nan_row", "out_of_scale", "duplicate_user", "no_slot",
                                  "glued_slot", "head_shape", "logs_user_without_prompt", "prompt_without_logs",
                                  "path_escape"])
def test_wrong_input_is_one_line_and_nothing_written(case, toy_dataset, tiny_model, tmp_path, load_job, capsys):
    _foreign_system(tmp_path / "sys", toy_dataset, tiny_model)
    change, expected = _break(case)
    change(tmp_path / "sys")
    rc = load_job("import_system").main(["--system", str(tmp_path / "sys"), "--output", str(tmp_path / "store")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "store").exists()


def test_import_from_s3(s3_server, toy_dataset, tiny_model, tmp_path):
    _foreign_system(tmp_path / "sys", toy_dataset, tiny_model)
    storage = StorageOptions(endpoint_url=s3_server["endpoint_url"], key=s3_server["key"],
                             secret=s3_server["secret"], region="us-east-1")
    prefix = f"s3://{s3_server['bucket']}/systems/{uuid.uuid4().hex[:10]}"
    fs, root = filesystem(prefix, storage)
    fs.put(str(tmp_path / "sys") + "/", root, recursive=True)
    manifest = import_system(ImportConfig(prefix + "/sys" if fs.exists(root + "/sys/system.json") else prefix,
                                          prefix + "-store", storage=storage), log=lambda *_: None)
    assert manifest.num_users == toy_dataset.records["user_id"].nunique()
    assert PromptStore.open(prefix + "-store", storage).read_all()[1].shape[1:] == (2, 48)


# ---------------------------------------------------------------------------------------------- end to end: migrate
def _migrate(load_job, out, source: str, source_model: str, data: dict, target: str = "tiny:llama",
             api: bool = False) -> dict:
    """jobs/migrate.py in process (engine.kind=local) on a small selection and fit, or (api) the same from Python:
    `puma_ray.migrate(config dict)`; its report.json."""
    import yaml

    import puma_ray
    config = {"sources": [{"store": source, "model": {"name": source_model}}], "target": {"name": target},
              "data": data, "engine": {"kind": "local"}, "threads": 1,
              "selection": {"strategy": "kmeans_variance", "budget": 10, "k": 4, "valid_users": 4},
              "fit": {"epochs": 2, "batch_size": 32, "patience": 1},
              "baselines": {"linear": False, "random_init": False, "source": True}}
    out.mkdir(parents=True)
    if api:
        returned = puma_ray.migrate(config, str(out / "run"))
    else:
        (out / "config.yaml").write_text(yaml.safe_dump(config))
        assert load_job("migrate").main(["--config", str(out / "config.yaml"), "--output", str(out / "run")]) == 0
    report = json.loads((out / "run" / "report.json").read_text())
    if api:
        assert returned["methods"] == report["methods"]
    assert report["format"] == "puma_ray.report/migrate/1"
    return report


@pytest.mark.parametrize("prompts", ["parquet", "peft"])
def test_round_trip_migrates_like_the_native_store(prompts, trained, tmp_path, load_job):
    """A trained store, exported to open formats (its prompts as Parquet, or as PEFT folders) and imported back as
    a foreign system, migrates to the same report as the native store: same users selected, same metrics (1e-6).
    About 10 s each on 2 cores."""
    store, paths = trained
    system = export_open(store, str(tmp_path / "open"), peft=prompts == "peft")
    _with_logs(tmp_path / "open", paths, **({"prompts": system["prompts_peft"]} if prompts == "peft" else {}))
    import_system(ImportConfig(str(tmp_path / "open"), str(tmp_path / "imported")), log=lambda *_: None)
    data = {"name": "parquet", "paths": paths}
    native = _migrate(load_job, tmp_path / "native", store, "tiny:stablelm", data, api=True)  # puma_ray.migrate
    imported = _migrate(load_job, tmp_path / "again", str(tmp_path / "imported"), "tiny:stablelm", data)
    assert native["selection"] == imported["selection"]  # the same users (their ids' checksum), the same counts
    assert set(native["methods"]) == set(imported["methods"]) == {"puma", "source"}
    diffs = {(method, name): abs(imported["methods"][method][name] - value)
             for method, metrics in native["methods"].items() for name, value in metrics.items()}
    print(f"round trip: {native['methods']['puma']}, max |difference| {max(diffs.values()):.2e}")  # with -s
    assert max(diffs.values()) <= 1e-6, diffs


def test_foreign_system_migrates_and_verifies(toy_dataset, tiny_model, tmp_path, load_job, capsys):
    """Built without this package's writer (numpy prompts, a plain-torch head, template text, CSV logs): imported,
    migrated on its own logs (generic records), and jobs/convert.py --verify passes on the target store. About 10 s
    on 2 cores (55 s measured under a load average of 17)."""
    _foreign_system(tmp_path / "sys", toy_dataset, tiny_model)
    assert load_job("import_system").main(["--system", str(tmp_path / "sys"), "--output",
                                           str(tmp_path / "store")]) == 0
    data = {"name": "generic", "paths": {"records": str(tmp_path / "sys" / "records.csv"),
                                         "items": str(tmp_path / "sys" / "items.csv")}}
    report = _migrate(load_job, tmp_path / "migrate", str(tmp_path / "store"), tiny_model("llama"), data,
                      target="tiny:stablelm")
    assert report["conversion"]["users"] == len(toy_dataset.users) and report["conversion"]["rejected"] == 0
    capsys.readouterr()
    assert load_job("convert").main(["--verify", report["store"]]) == 0, capsys.readouterr().err
    target = PromptStore.open(report["store"])
    assert target.manifest.lineage["sources"][0]["lineage"]["kind"] == "imported"
