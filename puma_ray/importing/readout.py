"""The readout in open form (docs/bring-your-own.md "Readout"): a head as safetensors + a small JSON naming its
layers, or a verbalizer over the label tokens. Both ways: the user's files → this package's head, and back.

head JSON (format puma_ray.head/1):
    {"format": "puma_ray.head/1", "task": "rating", "kind": "mlp", "activation": "relu",
     "layers": [{"weight": "<tensor name>", "bias": "<tensor name>"}, ...]}      Linear layers in order, ReLU between
    {"format": "puma_ray.head/1", "task": "ctr", "kind": "affine", "scale": "<name>", "bias": "<name>"}
                                                                   click logit = scale * label logit + bias
    {"format": "puma_ray.head/1", "task": ..., "kind": "verbalizer", "values": [1, 2, 3, 4, 5]}   no weights
        (+ "scale"/"bias" tensor names: a verbalizer trained further, its output = scale x verbalizer + bias)
A head reads the label tokens' logits at the answer position (in the template's label order).
"""
from __future__ import annotations

import torch

from puma_ray.artifacts.formats import OPEN_HEAD_FORMAT
from puma_ray.errors import SystemImportError
from puma_ray.models.heads import head_config, make_head


def _tensor(tensors: dict, name, where: str) -> torch.Tensor:
    if not isinstance(name, str) or name not in tensors:
        raise SystemImportError(f"{where}: names tensor {name!r}, which the weights file does not hold "
                                f"(it holds {sorted(tensors)[:6]})")
    return tensors[name]


def _scale_bias(spec: dict, tensors: dict, where: str) -> dict[str, torch.Tensor]:
    """The "scale" and "bias" tensors the spec names, each a single number (an affine head, a trained verbalizer)."""
    state = {}
    for key in ("scale", "bias"):
        value = _tensor(tensors, spec.get(key), f"{where} {key}")
        if value.numel() != 1:
            raise SystemImportError(f"{where} {key}: shape {tuple(value.shape)}, not a single number")
        state[key] = value.float().reshape(())
    return state


def head_from_open(spec: dict, tensors: dict[str, torch.Tensor], task: str, n_labels: int,
                   where: str) -> tuple[dict, dict]:
    """(state dict, head config) of this package's head for the user's readout; shapes checked against the
    number of label tokens and each other, one line naming the layer."""
    if not isinstance(spec, dict) or spec.get("format") != OPEN_HEAD_FORMAT:
        raise SystemImportError(f"{where}: format {spec.get('format') if isinstance(spec, dict) else None!r}; "
                                f"expected {OPEN_HEAD_FORMAT!r}")
    if spec.get("task", task) != task:
        raise SystemImportError(f"{where}: a head for task {spec.get('task')!r}, the system's task is {task!r}")
    kind = spec.get("kind")
    if kind == "verbalizer":
        values = spec.get("values", list(range(1, n_labels + 1)) if task == "rating" else [])
        if task == "rating" and (not isinstance(values, list) or len(values) != n_labels):
            raise SystemImportError(f"{where}: a rating verbalizer needs one value per label token ({n_labels})")
        head = make_head(task, {"kind": "VerbalizerHead", "values": values or [1.0]})
        if spec.get("scale") is not None:  # a verbalizer trained further here: its affine scale and bias
            head.load_state_dict(_scale_bias(spec, tensors, where))
        return head.state_dict(), head_config(task, head)
    if kind == "affine" and task == "ctr":
        head = make_head("ctr")
        head.load_state_dict(_scale_bias(spec, tensors, where))
        return head.state_dict(), head_config("ctr", head)
    if kind != "mlp" or task != "rating":
        raise SystemImportError(f"{where}: kind {kind!r} for task {task!r}; known: mlp (rating), affine (ctr), "
                                "verbalizer")
    if spec.get("activation", "relu") != "relu":
        raise SystemImportError(f"{where}: activation {spec.get('activation')!r}; this package's head uses relu")
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise SystemImportError(f"{where}: layers must be a non-empty list of {{weight, bias}}")
    sizes, state = [n_labels], {}
    for i, layer in enumerate(layers):
        at = f"{where} layer {i}"
        if not isinstance(layer, dict):
            raise SystemImportError(f"{at}: not a {{weight, bias}} object")
        weight, bias = _tensor(tensors, layer.get("weight"), at), _tensor(tensors, layer.get("bias"), at)
        if weight.ndim != 2 or weight.shape[1] != sizes[-1] or bias.shape != (weight.shape[0],):
            raise SystemImportError(f"{at}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not take "
                                    f"{sizes[-1]} inputs ({'the label tokens' if i == 0 else 'the layer before'})")
        state[f"net.{2 * i}.weight"], state[f"net.{2 * i}.bias"] = weight.float(), bias.float()
        sizes.append(int(weight.shape[0]))
    if sizes[-1] != 1:
        raise SystemImportError(f"{where}: the last layer gives {sizes[-1]} outputs; a rating head gives 1")
    head = make_head("rating", {"sizes": sizes})
    head.load_state_dict(state)
    return head.state_dict(), head_config("rating", head)


def head_to_open(state: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """This package's head → (tensors, head JSON) in the open form `head_from_open` reads back."""
    task, kind = config["task"], config.get("kind")
    tensors = {k: v.detach().float().contiguous() for k, v in state.items()}
    if kind == "VerbalizerHead":
        spec = {"format": OPEN_HEAD_FORMAT, "task": task, "kind": "verbalizer", "values": config["values"]}
        if float(tensors["scale"]) == 1.0 and float(tensors["bias"]) == 0.0:
            return {}, spec  # the plain verbalizer: no weights
        return tensors, {**spec, "scale": "scale", "bias": "bias"}  # trained further (a migration's target head)
    if kind == "CTRHead":
        return tensors, {"format": OPEN_HEAD_FORMAT, "task": task, "kind": "affine", "scale": "scale", "bias": "bias"}
    layers = [{"weight": f"net.{2 * i}.weight", "bias": f"net.{2 * i}.bias"} for i in range(len(config["sizes"]) - 1)]
    return tensors, {"format": OPEN_HEAD_FORMAT, "task": task, "kind": "mlp", "activation": "relu", "layers": layers}
