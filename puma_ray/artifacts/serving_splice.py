"""The template spliced in, for the serving export (artifacts/serving.py): what an inference server needs beside
each user's rows to build the whole `prompt_embeds` sequence and turn the model's output into a prediction.

    splice.json                   the recipe: the pieces in order ("fixed": a tensor of template_pieces + its token
                                  ids; "user": the user's l rows; "item" / "history": request-time token ids, with
                                  the rule that makes them), the readout (label token ids, position, output rule)
    template_pieces.safetensors   the fixed pieces' embeddings (model's input embedding, family scaling included),
                                  once for all users
    readout.safetensors           the label tokens' rows of the output layer (+ bias): for a server that gives hidden
                                  states instead of logits
    head.safetensors + head.json  the task head in the open form (importing/readout.py, format puma_ray.head/1)

Built from the store's own model (loaded and checked against the store's fingerprint) and its template, through
the PromptedLM that evaluates it: the pieces are exactly what the package's forward embeds. artifacts/
serving_reader.py reads them without this package's model code.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import save as st_save

from puma_ray.artifacts.formats import (
    OPEN_HEAD_LAYERS,
    OPEN_HEAD_WEIGHTS,
    SERVING_PIECES,
    SERVING_READOUT,
    SERVING_SPLICE,
    SERVING_SPLICE_FORMAT,
)
from puma_ray.artifacts.store import PromptStore
from puma_ray.config import TemplateConfig
from puma_ray.importing.readout import head_to_open
from puma_ray.models.backbone import load_backbone
from puma_ray.models.prompted_lm import ITEM_TOKEN, PromptedLM
from puma_ray.tasks import get_task

SPLICE_FILES = (SERVING_SPLICE, SERVING_PIECES, SERVING_READOUT, OPEN_HEAD_WEIGHTS, OPEN_HEAD_LAYERS)


def build_splice(store: PromptStore, dtype: torch.dtype, model: str | None = None) -> dict[str, bytes]:
    """file name → bytes of every splice file (splice.json among them). `model` names where the store's model is
    on this machine when its recorded name does not load here (a hub id cached elsewhere, a moved folder); the
    weights must still be the store's (fingerprint)."""
    identity = store.identity
    backbone = load_backbone(model or identity.name, identity.revision)
    store.check_model(backbone.identity)
    template = TemplateConfig(**store.manifest.template)
    plm = PromptedLM(backbone, template, store.manifest.prompt_length, {}, prefix_cache_mib=0)
    embed, out = backbone.model.get_input_embeddings(), backbone.model.get_output_embeddings()
    tensors, pieces = {}, []
    with torch.no_grad():
        for kind, ids in plm.template_pieces():
            if kind == "text":
                name = f"piece_{len(tensors)}"
                tensors[name] = embed(torch.tensor(ids)).float().to(dtype).contiguous()
                pieces.append({"kind": "fixed", "tensor": name, "ids": ids})
            else:
                pieces.append({"kind": kind, "length": plm.l} if kind == "user" else {"kind": kind})
        label_rows = {"label_weight": out.weight[plm.label_ids].float().contiguous()}
        if getattr(out, "bias", None) is not None:
            label_rows["label_bias"] = out.bias[plm.label_ids].float().contiguous()
    head_tensors, head_spec = head_to_open(*store.read_head())
    task = get_task(store.manifest.task)
    softcap = getattr(backbone.model.config, "final_logit_softcapping", None)
    splice = {
        "format": SERVING_SPLICE_FORMAT, "task": task.name, "pieces": pieces, "pieces_file": SERVING_PIECES,
        # the item's ids: its entity token (when the tokenizer has one) then " " + text, max_tokens from the start
        "item": {"entity_token": ITEM_TOKEN, "prefix": " ", "max_tokens": template.max_item_tokens},
        # CTR: the history's titles joined, the most recent max_tokens kept (the oldest are cut first)
        "history": {"separator": "; ", "prefix": " ", "max_tokens": template.max_history_tokens},
        "readout": {
            "position": -1,  # the last row of the assembled sequence: the answer cue
            "labels": list(template.labels), "label_token_ids": plm.label_ids,
            "label_rows": {"file": SERVING_READOUT, "weight": "label_weight",
                           "bias": "label_bias" if "label_bias" in label_rows else None},
            # the model's own logit softcapping (Gemma 2): logits = tanh(h.w / cap) * cap; None when the model has none
            "softcap": softcap,
            "head_layers": OPEN_HEAD_LAYERS, "head_weights": OPEN_HEAD_WEIGHTS if head_tensors else None,
            "output": {"sigmoid": task.name == "ctr", "clamp": list(task.clamp)},
        },
    }
    files = {SERVING_PIECES: st_save(tensors), SERVING_READOUT: st_save(label_rows),
             OPEN_HEAD_LAYERS: json.dumps(head_spec, indent=1).encode()}
    if head_tensors:
        files[OPEN_HEAD_WEIGHTS] = st_save(head_tensors)
    files[SERVING_SPLICE] = json.dumps(splice, indent=1).encode()
    return files
