"""A mistake in a config is one `error:` line and exit 2 from every job, before any work is written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from puma_ray.data import save_dataset
from puma_ray.recipes.jobs import JOBS

REPO = Path(__file__).resolve().parents[1]
# "one star" is several tokens for every tokenizer here: a label must be exactly one (its own id is read out)
BAD_TEMPLATE = {"labels": ["one star", "2", "3", "4", "5"]}


@pytest.fixture(scope="module")
def toy_data(toy_dataset, tmp_path_factory):
    paths = save_dataset(toy_dataset, str(tmp_path_factory.mktemp("toy_data")))
    return {"name": "parquet", "paths": {"records": paths["records"], "items": paths["items"]}}


def _migrate(data: dict) -> dict:
    return {"sources": [{"store": "{output}/source-store", "model": {"name": "tiny:llama"},
                         "prepare": {"epochs": 1, "batch_size": 64}}],
            "target": {"name": "tiny:qwen2"}, "data": data, "template": BAD_TEMPLATE,
            "selection": {"k": 3, "budget": 8, "valid_users": 5}, "fit": {"epochs": 1}, "engine": {"kind": "local"},
            "threads": 1}


def _configs(data: dict) -> dict[str, dict]:
    migrate = _migrate(data)
    return {
        "migrate": migrate,
        "train_prompts": {"model": {"name": "tiny:llama"}, "data": data, "template": BAD_TEMPLATE,
                          "train": {"epochs": 1}, "threads": 1},
        "sweep": {"migrate": migrate, "search": {"strategies": ["random"], "ks": [3], "budgets": [8]}},
        "benchmark": {"families": {"llama": {"name": "tiny:llama"}, "qwen2": {"name": "tiny:qwen2"}},
                      "prepare": {"epochs": 1},
                      "migrate": {k: v for k, v in migrate.items() if k not in ("sources", "target")},
                      "experiments": {"strategies": None}},
    }


@pytest.mark.parametrize("job", sorted(set(JOBS) - {"repair"}))  # repair reads a run folder, not data: test_repair.py
def test_multi_token_label_is_one_line_and_exit_2(job, toy_data, tmp_path):
    config = tmp_path / f"{job}.yaml"
    config.write_text(yaml.safe_dump(_configs(toy_data)[job]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, JOBS[job].script, "--config", str(config), "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and "'one star'" in lines[-1], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "report.json").exists()


@pytest.mark.parametrize("selection, message", [
    ({"budget": 500}, "selection.budget 500 asks for 500 users; the data has 40"),
    ({"budget": 30, "valid_users": 20}, r"selection.valid_users 20 asks for 20 users; only 10 are left"),
    ({"valid_users": 2.5}, r"selection.valid_users 2.5: give a user count"),
])
def test_impossible_selection_is_refused_before_any_training(selection, message, toy_data, tmp_path):
    """Checked against the users as soon as the data is read: no source store is trained first."""
    import puma_ray.recipes.migration as migrate
    from puma_ray.config import from_dict
    from puma_ray.errors import ConfigError
    config = _migrate(toy_data)
    config["template"] = {}
    config["selection"] = {**config["selection"], **selection}
    cfg = from_dict(migrate.MigrateJobConfig, config, "migrate")
    with pytest.raises(ConfigError, match=message):
        migrate.run(cfg, str(tmp_path / "out"), log=lambda *_: None)
    assert not (tmp_path / "out" / "source-store").exists()


def test_unknown_model_family_is_refused_at_config_time():
    from puma_ray.config import ModelConfig, from_dict
    from puma_ray.errors import ConfigError
    with pytest.raises(ConfigError, match=r"model.name 'tiny:gpt9': unknown family 'gpt9'; known: \['gemma3'"):
        from_dict(ModelConfig, {"name": "tiny:gpt9"}, "model")
    with pytest.raises(ConfigError, match=r"unknown family 'bert'"):
        from_dict(ModelConfig, {"name": "foundation:bert"}, "model")


@pytest.mark.parametrize("job", sorted(JOBS))
def test_help_lists_every_config_section(job):
    import dataclasses
    proc = subprocess.run([sys.executable, JOBS[job].script, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0
    sections = [f.name for f in dataclasses.fields(JOBS[job].config_cls()) if f.init]
    assert all(f"\n  {name}: " in proc.stdout for name in sections), proc.stdout


def test_help_shows_defaults_meanings_and_allowed_values():
    """--help is the reference: every field's default, its meaning (the comment beside it in the source) and,
    where a registry or a Literal bounds it, the allowed values."""
    import dataclasses
    import typing

    from puma_ray.config import field_docs
    from puma_ray.data import LOADERS
    from puma_ray.recipes.runs import config_sections
    from puma_ray.selection.strategies import STRATEGIES
    text = " ".join(config_sections(JOBS["migrate"].config_cls()).split())  # wrapped lines joined
    assert "budget: float = 0.1" in text and "users to fit on" in text
    assert all(name in text for name in STRATEGIES) and all(name in text for name in LOADERS)
    assert "[one of: float32, bfloat16, float16]" in text
    # every field of every job's config has a meaning: a new field without its why-comment fails here
    missing = []
    for job in JOBS.values():
        todo = [job.config_cls()]
        while todo:
            cls = todo.pop()
            docs = field_docs(cls)
            for f in dataclasses.fields(cls):
                inner = [a for a in (typing.get_args(typing.get_type_hints(cls)[f.name]) or
                                     (typing.get_type_hints(cls)[f.name],)) if dataclasses.is_dataclass(a)]
                todo += inner
                if f.init and f.name not in docs and not inner:
                    missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, sorted(set(missing))  # every field carries its why-comment


@pytest.mark.parametrize("job", ["migrate", "sweep", "train_prompts"])
def test_print_config_is_the_effective_config_and_loads_back(job, tmp_path, capsys):
    """--print-config prints the config after the file and the overrides (credentials masked); fed back as
    --config it is the same config, field for field."""
    import importlib.util

    from puma_ray.config import to_dict
    spec = importlib.util.spec_from_file_location(f"{job}_job_print", REPO / "jobs" / f"{job}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    override = {"migrate": "selection.budget=0.25", "sweep": "migrate.selection.k=7", "train_prompts": "train.lr=0.5"}
    secret = ("migrate." if job == "sweep" else "") + "storage.secret=hunter2-do-not-print"
    assert module.main(["--print-config", override[job], secret]) == 0
    printed = capsys.readouterr().out
    assert "hunter2" not in printed
    data = yaml.safe_load(printed)
    key, value = override[job].split("=")
    node = data
    for part in key.split("."):
        node = node[part]
    assert str(node) == value
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    expected, loaded = to_dict(JOBS[job].load(None, [override[job]])), to_dict(JOBS[job].load(str(path)))
    for cfg in (expected, loaded):  # the secret is masked in the print: everything else is the same config
        (cfg["migrate"] if job == "sweep" else cfg).pop("storage", None)
    assert loaded == expected


def test_docs_config_md_is_generated_from_the_code():
    """docs/config.md is what `python -m puma_ray.recipes.config_doc` prints: a field added or re-commented
    without regenerating it fails here."""
    from puma_ray.recipes.config_doc import config_markdown
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == config_markdown(), "regenerate: python -m puma_ray.recipes.config_doc > docs/config.md"
    assert all(f"## `{job.script}`" in committed for job in JOBS.values())
