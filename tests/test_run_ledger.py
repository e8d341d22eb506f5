"""The migration's run ledger (recipes/migration/ledger.py, runner.py): a rerun of the same migration into the same
output reuses every finished stage; a changed setting reruns its stage and what reads it, nothing else; --stages
and --skip run part of a migration; a ledger record is input like any other file.

In process, tiny models, 40 toy users: each run is seconds. The kill tests (a SIGKILLed job resumed by the same
command) are in test_migration_kill.py.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

import puma_ray.recipes.migration as migration
from puma_ray.config import ConfigError, from_dict
from puma_ray.data import save_dataset
from puma_ray.errors import StoreError
from puma_ray.recipes.migration.runner import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORDED = ["selection_statistics", "selection", "fit", "linear", "random_init", "candidates", "full_retrain",
            "evaluation", "conversion", "gate"]
# loads and assemblers: no record, they always run (the report, too, lists the stages before it)
ALWAYS = ["sources", "baselines"]


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def toy_paths(toy_dataset, tmp_path_factory):
    return save_dataset(toy_dataset, str(tmp_path_factory.mktemp("toy_data")))


def config(toy_paths, **changes):
    data = {"sources": [{"store": "{output}/source-store", "model": {"name": "tiny:stablelm"},
                         "prepare": {"epochs": 1, "batch_size": 32}}],
            "target": {"name": "tiny:llama"}, "data": {"name": "parquet", "paths": toy_paths},
            "selection": {"budget": 10, "k": 4, "valid_users": 4}, "fit": {"epochs": 2, "batch_size": 32},
            "baselines": {"full_retrain": True, "full_retrain_train": {"epochs": 1, "batch_size": 32}},
            "store": {"shard_rows": 16}}
    cfg = from_dict(migration.MigrateJobConfig, data, "test config")
    for key, value in changes.items():  # "fit.lr" -> cfg.fit.lr
        section, field = key.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})
    return cfg


def statuses(report) -> dict:
    return {name: s["status"] for name, s in report["stages"].items()}


@pytest.fixture(scope="module")
def first(toy_paths, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ledger"))
    return run(config(toy_paths), out, log=_quiet), out


def test_a_rerun_reuses_every_finished_stage(first, toy_paths):
    report, out = first
    assert set(statuses(report).values()) == {"ran"}
    # full retraining's store went through the gate's rule beside the migration's, on the same users
    full = report["gate"]["full_retrain"]
    assert full["users"] == report["gate"]["users"] == full["worse"] + full["better"] + full["unchanged"]
    from puma_ray.reports.gate import gate_markdown
    assert f"Full retraining on the same rule: {full['worse']} of {full['users']} users worse" in "\n".join(
        gate_markdown(report["gate"], None))
    assert sorted(os.listdir(os.path.join(out, "ledger"))) == sorted(
        [f"{n}.json" for n in RECORDED] + ["random_init.safetensors"])
    adapter = os.path.join(out, "adapter", "adapter.safetensors")
    mtime = os.stat(adapter).st_mtime_ns
    lines = []
    again = run(config(toy_paths), out, log=lines.append)
    assert statuses(again) == {**{n: "reused" for n in RECORDED}, **{n: "ran" for n in ALWAYS}}
    assert again["methods"] == report["methods"] and again["reference"] == report["reference"]
    assert again["gate"] == report["gate"] and again["adapter_choice"] == report["adapter_choice"]
    assert again["fits"] == report["fits"]
    assert os.stat(adapter).st_mtime_ns == mtime  # not fitted, not even rewritten
    assert any("stage 4/13 fit" in line and "reused from the ledger" in line for line in lines)
    assert "stages run: sources, baselines, report;" in lines[-1]


@pytest.mark.parametrize("change, reruns", [
    ({"gate.alpha": 0.1}, ["gate"]),
    # the adapter's lr: the three fits and everything reading them; the selection and full retraining stay
    ({"fit.lr": 0.003}, ["fit", "linear", "random_init", "candidates", "evaluation", "conversion", "gate"]),
    ({"selection.seed": 3}, ["selection_statistics", "selection", "fit", "linear", "random_init", "candidates",
                             "evaluation", "conversion", "gate"]),
])
def test_a_changed_setting_reruns_its_stage_and_what_reads_it(first, toy_paths, tmp_path, change, reruns):
    report, out = first
    copy = str(tmp_path / "run")
    import shutil
    shutil.copytree(out, copy)
    lines = []
    changed = run(config(toy_paths, **change), copy, log=lines.append)
    assert sorted(n for n, s in statuses(changed).items() if s == "ran") == sorted(reruns + ALWAYS)
    if "fit" in reruns:  # after the fit, the stages left have an ETA from this run's own rate
        assert any(line.startswith("stage 5/13 linear") and "ETA ~" in line for line in lines), lines
    if "gate.alpha" in change:
        assert changed["methods"] == report["methods"] and changed["gate"]["rule"] != report["gate"]["rule"]


def test_only_and_skip(first, toy_paths, tmp_path):
    report, out = first
    with pytest.raises(ConfigError, match="--stages: stage 'selection_statistics' has not finished"):
        run(config(toy_paths), str(tmp_path / "fresh"), log=_quiet, only=["conversion"])
    with pytest.raises(ConfigError, match="no stage 'fitt'"):
        run(config(toy_paths), out, log=_quiet, only=["fitt"])
    with pytest.raises(ConfigError, match="--skip fit: later stages read its output"):
        run(config(toy_paths), out, log=_quiet, skip=["fit"])
    # only the conversion again (the ledger's fit and evaluation reused); the run stops there: no report
    assert run(config(toy_paths), out, log=_quiet, only=["conversion"]) is None
    skipped = run(config(toy_paths), out, log=_quiet, skip=["full_retrain", "gate"])
    assert statuses(skipped)["full_retrain"] == "skipped" and "full_retrain" not in skipped["methods"]
    assert skipped["gate"] == {"skipped": "--skip gate"}
    # evaluation read another baselines set: it ran again; the fit did not
    assert statuses(skipped)["evaluation"] == "ran" and statuses(skipped)["fit"] == "reused"


def test_a_record_is_untrusted_input(first, toy_paths, tmp_path):
    import shutil
    _, out = first
    copy = str(tmp_path / "run")
    shutil.copytree(out, copy)
    path = os.path.join(copy, "ledger", "selection.json")
    record = json.load(open(path))
    record["output"]["chosen"] = ["no-such-user"]
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(StoreError, match=r"ledger selection \(chosen\): user 'no-such-user' is not among"):
        run(config(toy_paths), copy, log=_quiet)
    with open(path, "w") as f:
        f.write("not json")
    with pytest.raises(StoreError, match="selection.json.*not written by this package"):
        run(config(toy_paths), copy, log=_quiet)
    # the adapter swapped under a finished fit: its checksum differs, the fit runs again
    shutil.copytree(out, str(tmp_path / "run2"))
    weights = tmp_path / "run2" / "adapter" / "adapter.safetensors"
    lin = tmp_path / "run2" / "baselines" / "linear-adapter" / "adapter.safetensors"
    weights.write_bytes(lin.read_bytes())
    lines = []
    again = run(config(toy_paths), str(tmp_path / "run2"), log=lines.append)
    assert statuses(again)["fit"] == "ran" and any("is not the one this record names" in x for x in lines)


def test_the_plan_counts_what_the_run_spent(first, toy_paths, capsys):
    """--plan on a finished run's output (its source store exists, so the selection is the run's own): the LLM
    record passes of every fit and of full retraining are exactly the report's (every epoch ran: 2 epochs,
    patience 1 can only stop after the last), nothing is written."""
    from puma_ray.recipes.migration.plan import format_plan, plan_migration
    report, out = first
    before = sorted(str(p) for p in __import__("pathlib").Path(out).rglob("*"))
    plan = plan_migration(config(toy_paths), out, log=_quiet, measure_rate=False)
    stages = {s["stage"]: s for s in plan["stages"]}
    assert plan["fit_users_exact"] and plan["budget"] == 10 and plan["validation_users"] == 4
    for name in ("fit", "linear", "random_init"):
        key = "puma" if name == "fit" else name
        assert stages[name]["llm_record_passes"] == report["cost"][key]["llm_record_passes"], name
    assert stages["full_retrain"]["llm_record_passes"] == report["cost"]["full_retrain"]["llm_record_passes"]
    assert stages["sources"]["llm_record_passes"] == 0  # the source store exists: nothing to train first
    assert stages["fit"]["flops"] > 0 and "wall_s" not in stages["fit"]  # no rate measured here
    assert sorted(str(p) for p in __import__("pathlib").Path(out).rglob("*")) == before
    print(format_plan(plan))
    assert "LLM record passes" in capsys.readouterr().out


def test_candidate_adapters_are_fitted_tested_and_weighed_for_shipping(first, toy_paths, tmp_path):
    """baselines.candidates on a finished run: only the candidates' stage and what reads it run; each candidate is
    an adapter artifact with a test row; `ship: validation` picks the best of all adapters on every user's
    validation records; a rerun reuses the candidates; the plan counts their fits and the shipping passes."""
    import shutil

    from puma_ray.recipes.migration.plan import plan_migration
    report, out = first
    copy = str(tmp_path / "run")
    shutil.copytree(out, copy)
    cfg = config(toy_paths, **{"baselines.candidates": ["mlp_skip", "mlp:8"]})
    more = run(cfg, copy, log=_quiet)
    assert sorted(n for n, s in statuses(more).items() if s == "ran") == sorted(
        ["candidates", "evaluation", "conversion", "gate"] + ALWAYS)
    names = ["adapter_mlp_skip", "adapter_mlp_8"]
    for name in names:
        assert os.path.isfile(os.path.join(copy, "baselines", f"{name}-adapter", "adapter.safetensors"))
        assert more["methods"][name]["rmse"] > 0 and more["cost"][name]["llm_record_passes"] > 0
    assert more["methods"]["puma"] == report["methods"]["puma"]  # PUMA itself was not refitted
    choice = more["adapter_choice"]
    assert set(choice["validation"]) == {"puma", "linear", *names}
    assert choice["shipped"] == min(choice["validation"], key=choice["validation"].get)
    assert run(cfg, copy, log=_quiet)["stages"]["candidates"]["status"] == "reused"
    plan = {s["stage"]: s for s in plan_migration(cfg, copy, log=_quiet, measure_rate=False)["stages"]}
    assert plan["candidates"]["llm_record_passes"] == sum(more["cost"][n]["llm_record_passes"] for n in names)
    valid = more["data"]["records"]["valid"]
    assert plan["conversion"]["llm_record_passes"] == 4 * valid == 4 * choice["records"]
    with pytest.raises(ConfigError, match="adapter 'rnn'"):
        config(toy_paths, **{"baselines.candidates": ["rnn"]}).baselines.__post_init__()
