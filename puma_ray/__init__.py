"""PUMA on Ray: carry per-user soft prompts over to a new foundation LLM with one learned adapter.

The core (stores, backbones, prompts, adapter, selection, metrics) runs in a plain process and imports no Ray;
`puma_ray.ray_layer` puts it on a cluster.
"""
import os as _os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Measured on 2 cores with another busy
# process: a tiny model's step took 0.94 s on 2 spinning threads, 0.18 s passive, 0.13 s on one thread.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# The public surface, imported on first use (PEP 562): `import puma_ray` stays light (no torch, no Ray), and
# everything not listed here is internal and may move.
_PUBLIC = {
    "puma_ray.errors": ["PumaError", "ConfigError", "DataError", "StoreError", "AdapterError", "CheckpointError",
                        "TemplateError", "SystemImportError", "SelectionError", "SweepError", "ClusterError"],
    "puma_ray.tasks": ["TASKS", "Task", "get_task"],
    "puma_ray.config": ["ModelConfig", "FoundationConfig", "DataConfig", "TemplateConfig", "PromptTrainConfig",
                        "StoreConfig", "EngineConfig", "from_dict", "to_dict", "load_yaml"],
    "puma_ray.data": ["Dataset", "load_dataset", "save_dataset"],
    "puma_ray.models.backbone": ["load_backbone"],
    "puma_ray.models.prompted_lm": ["PromptedLM"],
    "puma_ray.models.adapter": ["AdapterConfig", "PromptAdapter"],
    "puma_ray.artifacts.store": ["PromptStore", "write_store"],
    "puma_ray.artifacts.adapter_io": ["save_adapter", "load_adapter"],
    "puma_ray.artifacts.verify": ["verify_store"],
    "puma_ray.artifacts.serving": ["export_for_serving"],
    "puma_ray.importing": ["ImportConfig", "import_system", "export_open"],
    "puma_ray.training.prompts": ["train_prompts"],
    "puma_ray.training.fit": ["FitConfig", "fit_mapping"],
    "puma_ray.training.loop": ["run_epochs"],
    "puma_ray.selection.strategies": ["STRATEGIES", "select"],
    "puma_ray.conversion.plan": ["ConvertConfig"],
    "puma_ray.conversion.run": ["convert"],
    "puma_ray.recipes.jobs": ["JOBS"],
    "puma_ray.recipes.migration.config": ["MigrateJobConfig"],
    "puma_ray.cli.migrate": ["migrate"],
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = ["__version__", *_HOME]


def __getattr__(name: str):
    if name in _HOME:
        import importlib
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'puma_ray' has no attribute {name!r}")
