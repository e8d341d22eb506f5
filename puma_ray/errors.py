"""Every error a user can cause, under one root: a job catches `PumaError`, prints its one line and exits 2.

Each class also subclasses ValueError, as the old per-module classes did, so `except ValueError` keeps working.
Anything that is not a PumaError is a bug in puma_ray (or in a library) and keeps its traceback.
"""
from __future__ import annotations


class PumaError(ValueError):
    """Root: bad input (config, data, artifact, template) that the user can fix; the message says how."""


class ConfigError(PumaError):
    """A config value (file, CLI override or embedded default) that cannot work; the message names the field."""


class DataError(PumaError):
    """A dataset file or records table that breaks the records/items contract; the message names the file."""


class StoreError(PumaError):
    """A prompt store that is incomplete, tampered with or belongs to another model."""


class AdapterError(PumaError):
    """An adapter artifact that is incomplete, of an unknown format, or does not fit the stores/models given."""


class CheckpointError(PumaError):
    """A fit checkpoint holding anything but the safetensors and JSON files a fit writes (never unpickled)."""


class TemplateError(PumaError):
    """A template that a tokenizer cannot serve (e.g. a label that is not exactly one token)."""


class SystemImportError(PumaError):
    """A user's own 1+N system (prompts, model, template, readout, logs) that does not fit together; the message
    names the file, row or user (importing/)."""


class SelectionError(PumaError):
    """A selection strategy, budget or K that cannot be satisfied on these users."""


class SweepError(PumaError):
    """A sweep whose search space or trials cannot produce a result."""


class ClusterError(PumaError):
    """A Ray cluster the job was told to join that cannot be reached (a wrong address, a stopped head, a stale
    session file); the message names the address."""


__all__ = ["PumaError", "ConfigError", "DataError", "StoreError", "AdapterError", "CheckpointError", "TemplateError",
           "SystemImportError", "SelectionError", "SweepError", "ClusterError"]
