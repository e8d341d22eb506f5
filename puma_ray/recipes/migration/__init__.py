"""A migration: sources → selection statistics → selection → fit → baselines → evaluation → conversion → report,
defined once (stages.py) and run by an executor (executor.py: in_process.py here, on_ray.py on a cluster)."""
from .config import BaselinesConfig, MigrateJobConfig, SelectionConfig, SourceConfig, resolve_foundations
from .report import format_report
from .runner import run
from .stages import STAGES, Stage

__all__ = ["BaselinesConfig", "MigrateJobConfig", "SelectionConfig", "SourceConfig", "resolve_foundations",
           "format_report", "STAGES", "Stage", "run"]
