"""Every config class round-trips through to_dict → YAML → from_dict, and from_dict names the field it refuses."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Literal

import pytest
import yaml

import puma_ray
from puma_ray.config import ConfigError, DataConfig, ModelConfig, from_dict, to_dict
from puma_ray.recipes.jobs import JOBS, REPO_ROOT


def _config_classes() -> dict[str, type]:
    """Every dataclass named *Config (or StorageOptions) that puma_ray defines, found by walking the package."""
    found = {}
    for info in pkgutil.walk_packages(puma_ray.__path__, "puma_ray."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__
                    and (name.endswith("Config") or name == "StorageOptions")):
                found[f"{obj.__module__}.{name}"] = obj
    return found


CLASSES = _config_classes()


def _example(cls: type):
    """A non-default instance where the class allows one (the shipped configs for the job configs)."""
    for job in JOBS.values():
        if job.config_cls() is cls:
            path = job.default_config or f"configs/{job.name}_ml100k_tiny.yaml"
            if job.name == "benchmark":
                path = "configs/benchmark_ml100k_small.yaml"
            return job.load(f"{REPO_ROOT}/{path}")
    try:
        return cls()
    except TypeError:  # required fields: a source's store path; an import's system folder and output store
        required = {"SourceConfig": {"store": "s3://bucket/source-store"},
                    "ImportConfig": {"system": "s3://bucket/system", "output": "s3://bucket/imported-store"}}
        return from_dict(cls, required[cls.__name__], cls.__name__)


def test_the_walk_finds_the_config_classes():
    names = {name.rsplit(".", 1)[1] for name in CLASSES}
    assert {"ModelConfig", "FoundationConfig", "DataConfig", "TemplateConfig", "PromptTrainConfig", "EngineConfig",
            "MigrateJobConfig", "SourceConfig", "SelectionConfig", "BaselinesConfig", "TrainPromptsJobConfig",
            "SweepJobConfig", "SearchConfig", "BenchmarkJobConfig", "ExperimentsConfig", "FitConfig", "ConvertConfig",
            "AdapterConfig", "StorageOptions", "StoreConfig", "SyntheticConfig"} <= names


@pytest.mark.parametrize("name", sorted(CLASSES), ids=lambda n: n.rsplit(".", 1)[1])
def test_round_trip_through_yaml(name):
    cls = CLASSES[name]
    original = _example(cls)
    text = yaml.safe_dump(to_dict(original), sort_keys=False)
    again = from_dict(cls, yaml.safe_load(text), name)
    assert again == original
    assert to_dict(again) == to_dict(original)


def test_nested_job_config_round_trips_with_its_sections():
    job = JOBS["migrate"].load(None)
    data = to_dict(job)
    assert isinstance(data["sources"][0]["model"]["foundation"], dict)  # nested dataclasses became mappings
    again = from_dict(type(job), data, "migrate")
    assert again.sources[0].model.foundation == job.sources[0].model.foundation


@pytest.mark.parametrize("cls, data, message", [
    (ModelConfig, {"seed": "two"}, "model.seed must be an integer, got 'two'"),
    (ModelConfig, {"dtype": "float8"}, r"model.dtype must be one of \['float32', 'bfloat16', 'float16'\], got 'fl"),
    (ModelConfig, {"foundation": {"lr": "abc"}}, "model.foundation.lr must be a number, got 'abc'"),
    (DataConfig, {"max_users": True}, "model.max_users must be an integer, got True"),
    (DataConfig, {"paths": ["records.parquet"]}, "model.paths must be a mapping"),
    (DataConfig, {"paths": {"records": 3}}, "model.paths.records must be a string, got int 3"),
    (ModelConfig, {"nmae": "x"}, r"model: unknown key\(s\) \['nmae'\]; did you mean 'name' for 'nmae'\?"),
    (ModelConfig, ["tiny:llama"], "model: expected a mapping, got list"),
])
def test_wrong_types_name_the_field(cls, data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(cls, data, "model")


def test_numbers_keep_their_kind():
    """A YAML 1.1 '1e-4' (read as a string) is a number for a float field; an integer stays an integer."""
    from puma_ray.training.fit import FitConfig
    fit = from_dict(FitConfig, {"lr": "1e-4", "head_lr": 1}, "fit")
    assert fit.lr == 1e-4 and fit.head_lr == 1 and isinstance(fit.head_lr, int)
    with pytest.raises(ConfigError, match="fit.weight_decay must be a number, got 'abc'"):
        from_dict(FitConfig, {"weight_decay": "abc"}, "fit")
    with pytest.raises(ConfigError, match="fit.epochs must be an integer, got 2.5"):
        from_dict(FitConfig, {"epochs": 2.5}, "fit")


def test_union_and_literal_hints():
    from puma_ray.config import convert_value
    assert convert_value(int | None, None, "x") is None
    assert convert_value(list[int | float], [1, 0.5], "x") == [1, 0.5]
    assert convert_value(Literal["a", "b"], "b", "x") == "b"
    with pytest.raises(ConfigError, match=r"x\[1\] must be a number, got 'y'"):
        convert_value(list[float], [1.0, "y"], "x")
    with pytest.raises(ConfigError, match="x.k must be an integer"):
        convert_value(dict[str, int], {"k": "v"}, "x")


def test_model_families_named_in_config_are_the_ones_tiny_builds():
    from puma_ray.config import MODEL_FAMILIES
    from puma_ray.models.tiny import FAMILIES
    assert sorted(MODEL_FAMILIES) == sorted(FAMILIES)


def test_template_wording_names_the_task_text():
    from puma_ray.config import TemplateConfig, task_template
    from puma_ray.tasks import CTR_ITEM_FIRST_TEMPLATE, RATING_ITEM_FIRST_TEMPLATE, RATING_TEMPLATE
    assert task_template(None, "rating").text == RATING_TEMPLATE
    chosen = from_dict(TemplateConfig, {"wording": "item_first", "max_item_tokens": 16}, "template")
    rating, ctr = task_template(chosen, "rating"), task_template(chosen, "ctr")
    assert rating.text == RATING_ITEM_FIRST_TEMPLATE and rating.max_item_tokens == 16
    assert ctr.text == CTR_ITEM_FIRST_TEMPLATE and ctr.labels == ["Yes"]
    assert rating.text.index("<ItemTitle>") < rating.text.index("<UserID>")  # the user's feature last
    with pytest.raises(ConfigError, match=r"template.wording must be one of \['paper', 'item_first'\]"):
        from_dict(TemplateConfig, {"wording": "items_first"}, "template")
