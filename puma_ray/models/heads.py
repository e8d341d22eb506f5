"""Task heads over the label-token logits, and the task losses (METHOD.md, Eq. 1).

rating: a 5→32→12→1 MLP (601 parameters, as the original) predicting a continuous rating;
        loss = 0.8·MSE(head, r) + 0.2·CE(logits5, r−1).
ctr:    an affine map of the "Yes" logit (2 parameters); loss = BCE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from puma_ray.tasks import get_task

MSE_WEIGHT, CE_WEIGHT = 0.8, 0.2  # the paper's mix: MSE fits the rating, CE keeps the 5 logits ordered


class RatingHead(nn.Module):
    def __init__(self, sizes=(5, 32, 12, 1), init_bias: float = 3.5):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.sizes = list(sizes)
        with torch.no_grad():  # start at a typical rating: the first epochs then go to user signal, not the mean
            self.net[-1].bias.fill_(init_bias)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.net(logits.to(self.net[0].weight.dtype)).squeeze(-1).float()


class CTRHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.sizes = [1, 1]

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits.float()[..., 0] * self.scale.float() + self.bias.float())  # a click logit


class VerbalizerHead(nn.Module):
    """A readout over the label tokens that needs no trained head (an imported system's verbalizer): rating: the
    expected label value under the softmax of the label logits; ctr: the first label's logit minus the second's
    (the first alone when there is one). An affine scale/bias (1, 0: the plain verbalizer) keeps it trainable."""

    def __init__(self, task: str, values=(1.0, 2.0, 3.0, 4.0, 5.0)):
        super().__init__()
        self.task, self.values = task, [float(v) for v in values]
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.sizes = [len(self.values), 1]

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.task == "rating":
            values = torch.tensor(self.values, device=logits.device)
            raw = (torch.softmax(logits, -1) * values).sum(-1)
        else:
            raw = logits[..., 0] - logits[..., 1] if logits.shape[-1] > 1 else logits[..., 0]
        return raw * self.scale.float() + self.bias.float()


def make_head(task: str, config: dict | None = None) -> nn.Module:
    if (config or {}).get("kind") == "VerbalizerHead":
        return VerbalizerHead(task, config.get("values", (1.0, 2.0, 3.0, 4.0, 5.0)))
    if task == "rating":
        return RatingHead(tuple((config or {}).get("sizes", (5, 32, 12, 1))))
    if task == "ctr":
        return CTRHead()
    raise ValueError(f"unknown task {task!r}")


def head_config(task: str, head: nn.Module) -> dict:
    config = {"task": task, "kind": type(head).__name__, "sizes": head.sizes}
    return {**config, "values": head.values} if isinstance(head, VerbalizerHead) else config


def load_head(state: dict, config: dict) -> nn.Module:
    head = make_head(config["task"], config)
    head.load_state_dict(state)
    return head


def record_losses(task: str, head: nn.Module, logits: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-record loss, predictions): predictions are ratings (rating) or click probabilities (ctr). Computed on
    the head's device: in process the head stays on the CPU while the model may run on a GPU (ModelConfig.device)."""
    device = next(head.parameters()).device
    logits = logits.to(device)
    out = head(logits)
    labels = labels.to(device).float()
    if task == "rating":
        classes = (labels.round().clamp(1, 5) - 1).long()
        loss = (MSE_WEIGHT * F.mse_loss(out, labels, reduction="none")
                + CE_WEIGHT * F.cross_entropy(logits.float(), classes, reduction="none"))
        return loss, out.detach()
    loss = F.binary_cross_entropy_with_logits(out, labels, reduction="none")
    return loss, torch.sigmoid(out.detach())


def task_loss(task: str, head: nn.Module, logits: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, predictions)."""
    loss, pred = record_losses(task, head, logits, labels)
    return loss.mean(), pred


def clamp_predictions(task: str, pred):
    """Ratings outside 1..5 are never right: clamp before RMSE (the reference predictors get the same)."""
    low, high = get_task(task).clamp
    return pred.clip(low, high)
