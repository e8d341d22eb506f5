"""The identity of a resumable piece of work: a short hash of what made it (config, inputs, code version).

A fit's checkpoints live in a folder named by it, so a rerun with other settings (lr, selection, adapter kind,
another source store) starts fresh in its own folder, and only the very same fit resumes: before, a rerun under a
new config silently resumed the old fit's weights, or died in a `state_dict` traceback when the adapter's shape
changed. A module enters by its parameters (names, shapes, initial values), never its buffers: a buffer is
derived from the inputs (the adapter's scales) or a cache, and would only make two equal fits look different.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from puma_ray import __version__

# Why 12 hex digits (48 bits): folder names stay short, and two different fits under one output colliding by chance
# is ~1e-14 for 100 fits.
IDENTITY_CHARS = 12


class RunIdentity:
    """Feeds a sha256 piece by piece (each piece tagged by its name, so a value cannot pass for another)."""

    def __init__(self, kind: str):
        self._h = hashlib.sha256()
        self.add("kind", kind)
        self.add("puma_ray", __version__)  # another code version, another fit: its loop may differ

    def _tag(self, name: str, *parts) -> None:
        self._h.update(json.dumps([name, *parts], sort_keys=True, default=str).encode())

    def add(self, name: str, value) -> "RunIdentity":
        """A JSON-able value (a dataclass config is taken field by field)."""
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        self._tag(name, value)
        return self

    def add_array(self, name: str, array) -> "RunIdentity":
        a = np.ascontiguousarray(array)
        if a.dtype.kind in "OUS":  # ids: their text, one per line (object arrays have no stable bytes)
            self._tag(name, "text", list(a.shape))
            self._h.update("\n".join(map(str, a.ravel())).encode())
        else:
            self._tag(name, a.dtype.str, list(a.shape))
            self._h.update(a.tobytes())
        return self

    def add_frame(self, name: str, frame, columns: list[str]) -> "RunIdentity":
        """A records table by the given columns (those it has), in row order."""
        import pandas as pd
        present = [c for c in columns if c in frame.columns]
        self._tag(name, present, len(frame))
        self._h.update(pd.util.hash_pandas_object(frame[present], index=False).to_numpy().tobytes())
        return self

    def add_module(self, name: str, module) -> "RunIdentity":
        """A torch module by its parameters (its architecture follows from their names and shapes)."""
        self._tag(name, type(module).__name__)
        for pname, p in module.named_parameters():
            self.add_array(f"{name}.{pname}", p.detach().float().cpu().numpy())
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:IDENTITY_CHARS]
