"""Reads a serving export (artifacts/serving.py) for an inference server, with numpy, torch and safetensors only:
nothing of this package's model code, so that a server imports it (or copies the ~200 lines) beside its engine.

    ServingPrompts(dir).get(user)            the user's (l, d) rows (every export has them)
    SplicedSystem(dir, embed).assemble(user, item_ids[, history_ids])
                                             the whole (n, d) input sequence for `prompt_embeds` / `inputs_embeds`
    SplicedSystem.item_ids(tokenizer, item_id, text) / history_ids(tokenizer, texts)
                                             the request-time token ids, by the rule the model was trained with
    SplicedSystem.predict(label_logits)      the model's label-token logits at the last position → the prediction

A request: tokenize the item (and, for CTR, the history) with the model's own tokenizer, `assemble`, run the
model on the sequence, take the logits of `label_token_ids` at the last position, `predict`. Everything it reads
is checked: names stay inside the folder, JSON is bounded, shapes must agree with splice.json.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from puma_ray.artifacts.formats import (
    OPEN_HEAD_FORMAT,
    SERVING_EXPORT,
    SERVING_FORMAT,
    SERVING_SPLICE_FORMAT,
    check_format,
)
from puma_ray.errors import StoreError
from puma_ray.fs import plain_name

TENSOR = "prompt_embeds"
MAX_JSON_BYTES = 1 << 20  # export.json / splice.json / head.json: a few KiB; anything bigger is not ours
MAX_PIECE_BYTES = 1 << 30  # the fixed pieces and label rows: (template tokens + labels) x d floats


def _read_bounded(folder: str, name, what: str, limit: int) -> bytes:
    path = os.path.join(folder, plain_name(name, what, StoreError))
    if not os.path.isfile(path):
        raise StoreError(f"{what}: {path} is missing (incomplete export, or not one)")
    if os.path.getsize(path) > limit:
        raise StoreError(f"{what}: {path} is over {limit} bytes; not a file this package wrote")
    with open(path, "rb") as f:
        return f.read(limit + 1)


def _read_json(folder: str, name, what: str) -> dict:
    try:
        data = json.loads(_read_bounded(folder, name, what, MAX_JSON_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{what}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{what}: not a JSON object")
    return data


class ServingPrompts:
    """A local export opened for lookups: `get(user_id)` → (l, d) tensor; `users` lists every user."""

    def __init__(self, folder: str):
        self.export = _read_json(folder, SERVING_EXPORT, f"export {folder}")
        check_format(self.export.get("format"), SERVING_FORMAT, f"{folder}/{SERVING_EXPORT}", StoreError)
        self.folder, self._where = folder, {}
        for entry in self.export["files"]:
            plain_name(entry.get("file"), f"export {folder} {SERVING_EXPORT} files", StoreError)
            with safe_open(os.path.join(folder, entry["file"]), "pt") as f:
                ids = json.loads(f.metadata()["user_ids"])
            self._where.update({u: (entry["file"], row) for row, u in enumerate(ids)})

    @property
    def users(self) -> list[str]:
        return list(self._where)

    def get(self, user_id: str) -> torch.Tensor:
        return self.batch([user_id])[0]

    def batch(self, user_ids: list[str]) -> torch.Tensor:
        """(n, l, d) in the order asked; each file is opened once per call, however many of its users are asked."""
        missing = [u for u in user_ids if u not in self._where]
        if missing:
            raise KeyError(f"user {missing[0]!r} is not in the export {self.folder}")
        if not user_ids:
            return torch.empty(0)
        by_file: dict[str, list[int]] = {}
        for i, u in enumerate(user_ids):
            by_file.setdefault(self._where[u][0], []).append(i)
        out: list[torch.Tensor | None] = [None] * len(user_ids)
        for file, positions in by_file.items():
            with safe_open(os.path.join(self.folder, file), "pt") as f:
                rows = f.get_slice(TENSOR)
                for i in positions:
                    row = self._where[user_ids[i]][1]
                    out[i] = rows[row:row + 1][0]
        return torch.stack(out)


class SplicedSystem(ServingPrompts):
    """An export with the template spliced in. `embed` turns request-time token ids (the item's, the history's)
    into rows: the model's own input embedding (e.g. `model.get_input_embeddings()`, which applies any family
    scaling); without it, `assemble` takes those pieces already embedded."""

    def __init__(self, folder: str, embed=None):
        super().__init__(folder)
        name = self.export.get("splice")
        if not isinstance(name, dict):
            raise StoreError(f"export {folder} holds the per-user rows only (no splice.json): export it with "
                             "jobs/export_system.py --format serving")
        where = f"export {folder} splice"
        self.splice = _read_json(folder, name.get("file"), where)
        check_format(self.splice.get("format"), SERVING_SPLICE_FORMAT, where, StoreError)
        self.embed = embed
        tensors = st_load(_read_bounded(folder, self.splice["pieces_file"], where, MAX_PIECE_BYTES))
        self.pieces = self.splice["pieces"]
        d, l = self.export["hidden_size"], self.export["prompt_length"]
        self.fixed: dict[int, torch.Tensor] = {}
        for k, piece in enumerate(self.pieces):
            if piece["kind"] == "fixed":
                rows = tensors.get(piece["tensor"])
                if rows is None or tuple(rows.shape) != (len(piece["ids"]), d):
                    raise StoreError(f"{where}: piece {k} ({piece['tensor']!r}) is not ({len(piece['ids'])}, {d})")
                self.fixed[k] = rows
            elif piece["kind"] == "user" and piece["length"] != l:
                raise StoreError(f"{where}: the user piece has length {piece['length']}, the rows {l}")
        readout = self.splice["readout"]
        self.label_token_ids = [int(i) for i in readout["label_token_ids"]]
        self.head_spec = _read_json(folder, readout["head_layers"], f"{where} head")
        check_format(self.head_spec.get("format"), OPEN_HEAD_FORMAT, f"{where} head", StoreError)
        weights = readout.get("head_weights")
        self.head = st_load(_read_bounded(folder, weights, f"{where} head", MAX_PIECE_BYTES)) if weights else {}

    # ---- request-time token ids: the rule the model saw in training ------------------------------------------
    def item_ids(self, tokenizer, item_id: str, text: str) -> list[int]:
        """The item slot's ids: the item's entity token when the tokenizer has one (a foundation's), then
        " " + text, cut to max_tokens from the start."""
        rule = self.splice["item"]
        entity = tokenizer.get_added_vocab().get(rule["entity_token"].format(item_id))
        room = rule["max_tokens"] - (entity is not None)
        ids = tokenizer.encode(rule["prefix"] + text, add_special_tokens=False)[:room]
        return ([entity] if entity is not None else []) + ids

    def history_ids(self, tokenizer, texts: list[str]) -> list[int]:
        """The history slot's ids (CTR): the titles joined, the most recent that fit (cut from the start)."""
        rule = self.splice["history"]
        if not texts:
            return []
        ids = tokenizer.encode(rule["prefix"] + rule["separator"].join(texts), add_special_tokens=False)
        return ids[-rule["max_tokens"]:]

    # ---- the sequence -------------------------------------------------------------------------------------------
    def _rows(self, filled, what: str) -> torch.Tensor:
        if isinstance(filled, torch.Tensor) and filled.is_floating_point():
            return filled
        if len(filled) == 0:  # an empty history: no rows, and no embedding needed for them
            return torch.zeros(0, self.export["hidden_size"])
        if self.embed is None:
            raise ValueError(f"{what} given as token ids: open the export with embed= (the model's input embedding)")
        with torch.no_grad():
            return self.embed(torch.as_tensor(list(filled), dtype=torch.long))

    def assemble(self, user_id: str, item_ids, history_ids=None) -> torch.Tensor:
        """(n, d) float32: every piece in order, the user's rows at their slot; its last row is the answer cue,
        where the label tokens are read."""
        parts = []
        for k, piece in enumerate(self.pieces):
            kind = piece["kind"]
            if kind == "fixed":
                parts.append(self.fixed[k])
            elif kind == "user":
                parts.append(self.get(user_id))
            elif kind == "item":
                parts.append(self._rows(item_ids, "the item"))
            else:
                parts.append(self._rows(history_ids or [], "the history"))
        return torch.cat([p.float().reshape(-1, p.shape[-1]) for p in parts])

    def user_offset(self, item_length: int = 0, history_length: int = 0) -> int:
        """Where the user's rows start in the assembled sequence (request-time pieces before it count)."""
        lengths = {"item": item_length, "history": history_length}
        offset = 0
        for piece in self.pieces:
            if piece["kind"] == "user":
                return offset
            offset += len(piece["ids"]) if piece["kind"] == "fixed" else lengths[piece["kind"]]
        raise StoreError(f"export {self.folder}: splice.json has no user piece")

    # ---- readout ------------------------------------------------------------------------------------------------
    def predict(self, label_logits: torch.Tensor) -> torch.Tensor:
        """(..., n_labels) logits of `label_token_ids` at the last position → ratings (clamped) or click
        probabilities: the package's head in plain torch."""
        spec, x = self.head_spec, label_logits.float()
        kind = spec.get("kind")
        if kind == "mlp":
            layers = spec["layers"]
            for i, layer in enumerate(layers):
                x = x @ self.head[layer["weight"]].float().T + self.head[layer["bias"]].float()
                if i < len(layers) - 1:
                    x = torch.relu(x)
            x = x[..., 0]
        elif kind == "affine":
            x = x[..., 0] * self.head[spec["scale"]].float().reshape(()) + self.head[spec["bias"]].float().reshape(())
        elif kind == "verbalizer":
            if self.splice["task"] == "rating":
                x = (torch.softmax(x, -1) * torch.tensor(spec["values"], dtype=torch.float32)).sum(-1)
            else:
                x = x[..., 0] - x[..., 1] if x.shape[-1] > 1 else x[..., 0]
            if spec.get("scale") is not None:  # a verbalizer trained further (its affine scale/bias)
                x = x * self.head[spec["scale"]].float().reshape(()) + self.head[spec["bias"]].float().reshape(())
        else:
            raise StoreError(f"export {self.folder} head: kind {kind!r} is not one this reader knows")
        out = self.splice["readout"]["output"]
        if out["sigmoid"]:
            x = torch.sigmoid(x)
        return x.clamp(*out["clamp"])
