"""Checks of an imported system against its model, each refusal one SystemImportError naming the file, row or
user. They run on what was read, before anything is written: a refused import leaves no file behind."""
from __future__ import annotations

import numpy as np

from puma_ray.artifacts.store import finite_rows, out_of_scale_rows, rms_per_user
from puma_ray.config import TemplateConfig
from puma_ray.errors import SystemImportError


def prompt_shape(prompts: np.ndarray, hidden_size: int, declared_length, where: str) -> np.ndarray:
    """(n, l*d) or (n, l, d) → (n, l, d) at the model's width; the width and the declared length checked."""
    if prompts.ndim == 3:
        if prompts.shape[2] != hidden_size:
            raise SystemImportError(f"{where}: prompt rows of width {prompts.shape[2]}, the model's hidden size is "
                                    f"{hidden_size}")
        shaped = prompts
    else:
        width = prompts.shape[1]
        if width == 0 or width % hidden_size:
            raise SystemImportError(f"{where}: {width} floats per user is not a whole number of rows of the model's "
                                    f"hidden size {hidden_size}")
        shaped = prompts.reshape(len(prompts), width // hidden_size, hidden_size)
    if declared_length is not None and shaped.shape[1] != declared_length:
        raise SystemImportError(f"{where}: prompts of length {shaped.shape[1]}, system.json prompts.prompt_length "
                                f"says {declared_length}")
    return shaped


def finite_and_unique(user_ids: np.ndarray, prompts: np.ndarray, where: str) -> None:
    bad = ~finite_rows(prompts)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SystemImportError(f"{where} row {row}: non-finite prompt for user {str(user_ids[row])!r} "
                                f"({int(bad.sum())} user(s) in all)")
    ordered = np.sort(user_ids)
    twice = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(twice):
        raise SystemImportError(f"{where}: user {str(twice[0])!r} has more than one prompt")


def scale_report(user_ids: np.ndarray, prompts: np.ndarray, embedding_rms: float, bound: float, allow: bool,
          where: str) -> dict:
    """The prompts' RMS against the model's embedding RMS: reported always; a user beyond `bound` x either way
    refused unless `allow` (the import then records them)."""
    rms = rms_per_user(prompts)
    ratio = float(np.median(rms) / embedding_rms) if len(rms) and embedding_rms > 0 else float("nan")
    out = out_of_scale_rows(prompts, embedding_rms, bound)
    report = {"embedding_rms": embedding_rms, "median_prompt_rms": float(np.median(rms)) if len(rms) else None,
              "median_ratio": ratio, "bound": bound, "out_of_scale_users": int(out.sum())}
    if out.any() and not allow:
        row = int(np.flatnonzero(out)[0])
        raise SystemImportError(f"{where} row {row}: user {str(user_ids[row])!r} has a prompt RMS {rms[row]:.4g}, "
                                f"{rms[row] / embedding_rms:.3g}x the model's embedding RMS {embedding_rms:.4g} "
                                f"(bound {bound:g}x; {int(out.sum())} user(s) in all); allow_out_of_scale to "
                                "import them anyway")
    return report


def users_match_logs(user_ids: np.ndarray, log_users: np.ndarray, prompts_where: str, logs_where: str) -> None:
    """Every user of the logs has a prompt and every prompt a user in the logs (the migration reads both)."""
    no_prompt = np.setdiff1d(log_users, user_ids)
    if len(no_prompt):
        raise SystemImportError(f"{logs_where}: user {str(no_prompt[0])!r} has records but no prompt in "
                                f"{prompts_where} ({len(no_prompt)} user(s) in all)")
    no_logs = np.setdiff1d(user_ids, log_users)
    if len(no_logs):
        raise SystemImportError(f"{prompts_where}: user {str(no_logs[0])!r} has a prompt but no records in "
                                f"{logs_where} ({len(no_logs)} user(s) in all)")


def template_renders(template: TemplateConfig, tokenizer, where: str) -> None:
    """The user slot where their system put it: in the tokenizer's rendering of the whole text, every token that
    overlaps the slot's characters holds no letter or digit besides the slot's own (whitespace and punctuation may
    merge: the rendering splits at the slot anyway). Otherwise the slot is glued to a word ("feature<UserID>s"),
    and the user's system cannot have placed the prompt rows where this rendering does."""
    slot = template.user_placeholder
    count = template.text.count(slot)
    if count != 1:
        raise SystemImportError(f"{where}: the template holds the user slot {slot!r} {count} times; it must hold "
                                "it once")
    start = template.text.index(slot)
    end = start + len(slot)
    try:
        offsets = tokenizer(template.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # a slow tokenizer has no offsets: nothing to check by
        return
    for a, b in offsets:
        neighbour = template.text[a:start] + template.text[end:b] if a < end and b > start else ""
        if any(c.isalnum() for c in neighbour):
            raise SystemImportError(f"{where}: the tokenizer merges the user slot {slot!r} with its neighbour "
                                    f"{template.text[min(a, start):max(b, end)]!r}; put a space or punctuation on "
                                    "each side of the slot")
