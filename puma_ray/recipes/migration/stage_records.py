"""What each stage leaves in the run ledger (ledger.py) and how a rerun gets the stage's output back from it.

`save_<stage>(run, ledger, output, *inputs) -> dict` is called once the stage has finished (its artifacts written);
`restore_<stage>(run, ex, ledger, record, *inputs)` rebuilds the output from the record and the artifacts the
config names, or returns None when they are not what the record says (then the stage runs again). Inputs are the
same stage outputs the stage itself reads (stages.py, `Stage.inputs`).
"""
from __future__ import annotations

import numpy as np

from puma_ray.artifacts.adapter_io import load_adapter
from puma_ray.artifacts.formats import ADAPTER_WEIGHTS, STORE_MANIFEST, sha256_hex
from puma_ray.artifacts.store_index import sorted_positions
from puma_ray.errors import StoreError
from puma_ray.fs import filesystem, join
from puma_ray.models.backbone import load_model
from puma_ray.models.heads import head_config, load_head
from puma_ray.models.prompted_lm import PromptedLM
from puma_ray.training.fit import FitResult, FixedPrompts

from .executor import Executor, Run
from .handles import Conversion, Evaluation, Fits, Fitted, Gate, Selection, Sources, Statistics
from .ledger import MUST_RUN, Ledger, cost_from

_ADAPTER_CONFIG_KEYS = ("format", "package", "architecture", "source_dims", "target_dim", "num_parameters", "head",
                        "metrics")  # what save_adapter writes itself: not part of a fit's meta


def store_exists(path: str, storage) -> bool:
    """Whether a complete store (its manifest, written last) is at `path`."""
    fs, root = filesystem(path, storage)
    return fs.exists(join(root, STORE_MANIFEST))


def _result_record(result: FitResult) -> dict:
    return {"history": result.history, "best_epoch": result.best_epoch, "valid": result.valid,
            "cost": result.cost.state(), "checkpoints": result.checkpoints}


def _result(record: dict, where: str, mapping, head) -> FitResult:
    try:
        return FitResult(mapping, head, list(record["history"]), int(record["best_epoch"]), dict(record["valid"]),
                         cost_from(record["cost"], where), record.get("checkpoints"))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{where}: not a fit record ({type(e).__name__}: {e})") from None


def _weights_sha(run: Run, path: str) -> str:
    fs, root = filesystem(path, run.cfg.storage)
    with fs.open(join(root, ADAPTER_WEIGHTS), "rb") as f:
        return sha256_hex(f.read())


def _users_at(src: Sources, ids, where: str) -> np.ndarray:
    """Indices into the (sorted) joined users of the ids a record lists; a StoreError if one is not there."""
    ids = np.asarray([str(u) for u in ids], dtype=str)
    idx = sorted_positions(src.users, ids)
    if (idx < 0).any():
        raise StoreError(f"{where}: user {str(ids[idx < 0][0])!r} is not among this run's users")
    return idx


# ---- selection_statistics: the scales the adapters are built with (the per-user features only the selection
# reads, so a rerun whose selection runs again computes them again: Stage.full_for)
def save_statistics(run: Run, ledger: Ledger, stats: Statistics, src: Sources) -> dict:
    return {"scales": [float(s) for s in stats.scales], "cost": stats.cost.state()}


def restore_statistics(run: Run, ex: Executor, ledger: Ledger, record: dict, src: Sources) -> Statistics:
    return Statistics(None, cost_from(record["cost"], "ledger selection_statistics"),
                      [float(s) for s in record["scales"]])


# ---- selection: the chosen and validation users, by id
def save_selection(run: Run, ledger: Ledger, sel: Selection, src: Sources, stats: Statistics) -> dict:
    return {"budget": int(sel.budget), "chosen": src.users[sel.chosen].tolist(),
            "valid": src.users[sel.valid_idx].tolist(), "cost": sel.cost.state()}


def restore_selection(run: Run, ex: Executor, ledger: Ledger, record: dict, src: Sources,
                      stats: Statistics) -> Selection:
    chosen = _users_at(src, record["chosen"], "ledger selection (chosen)")
    valid_idx = _users_at(src, record["valid"], "ledger selection (valid)")
    return Selection(int(record["budget"]), chosen, valid_idx, np.union1d(chosen, valid_idx),
                     cost_from(record["cost"], "ledger selection"))


# ---- an adapter fit (PUMA's, the linear map's): the adapter artifact is the output, the record its fit figures
def save_adapter_fit(run: Run, fitted: Fitted | None) -> dict:
    if fitted is None:
        return {"none": True}
    return {"weights_sha256": _weights_sha(run, fitted.adapter), "result": _result_record(fitted.result)}


def restore_adapter_fit(run: Run, record: dict, path: str, where: str) -> Fitted | None | bool:
    """The fitted adapter at `path` as the fit left it (None: the fit was disabled); False when the artifact is
    not the one the record names (the stage runs again)."""
    if record.get("none"):
        return None
    try:
        if _weights_sha(run, path) != record["weights_sha256"]:
            run.log(f"{where}: the adapter at {path} is not the one this record names; the fit runs again")
            return False
    except FileNotFoundError:
        run.log(f"{where}: no adapter at {path}; the fit runs again")
        return False
    adapter, head, config = load_adapter(path, run.cfg.storage)
    meta = {k: v for k, v in config.items() if k not in _ADAPTER_CONFIG_KEYS}
    return Fitted(_result(record["result"], where, adapter, head), path, meta=meta)


def save_fit(run: Run, ledger: Ledger, fits: Fits, src, stats, sel) -> dict:
    return save_adapter_fit(run, fits.methods["puma"])


def restore_fit(run: Run, ex: Executor, ledger: Ledger, record: dict, src: Sources, stats: Statistics,
                sel: Selection) -> Fits:
    fitted = restore_adapter_fit(run, record, run.cfg.adapter_path.format(output=run.output), "ledger fit")
    if not fitted:
        return MUST_RUN
    target = load_model(run.cfg.target)
    plm = PromptedLM(target, src.template, src.l, src.texts, run.cfg.target.prefix_cache_mib)
    return Fits(target, plm, ex.fit_data(run, src, sel), {"puma": fitted})


def save_linear(run: Run, ledger: Ledger, fitted, *inputs) -> dict:
    return save_adapter_fit(run, fitted)


def linear_path(run: Run) -> str:
    return join(run.output, "baselines", "linear-adapter")


def restore_linear(run: Run, ex: Executor, ledger: Ledger, record: dict, *inputs):
    fitted = restore_adapter_fit(run, record, linear_path(run), "ledger linear")
    return MUST_RUN if fitted is False else fitted


def candidate_path(run: Run, name: str) -> str:
    return join(run.output, "baselines", f"{name}-adapter")


def save_candidates(run: Run, ledger: Ledger, fitted: dict, *inputs) -> dict:
    return {"candidates": {name: save_adapter_fit(run, f) for name, f in fitted.items()}}


def restore_candidates(run: Run, ex: Executor, ledger: Ledger, record: dict, *inputs):
    """Every candidate the record names, each checked against its weights' checksum (one mismatch: all refit)."""
    out = {}
    for name, entry in record["candidates"].items():
        if not isinstance(name, str) or not name.startswith("adapter_") or "/" in name or ".." in name:
            raise StoreError(f"ledger candidates: {name!r} is not a candidate adapter's name")
        fitted = restore_adapter_fit(run, entry, candidate_path(run, name), f"ledger candidates {name}")
        if not fitted:
            return MUST_RUN
        out[name] = fitted
    return out


def shipped_path(run: Run, name: str) -> str:
    """Where the adapter named `name` (PUMA, the linear map or a candidate) lies in this run."""
    if name == "puma":
        return run.cfg.adapter_path.format(output=run.output)
    return linear_path(run) if name == "linear" else candidate_path(run, name)


# ---- random_init: the prompts follow from the seed; the head trained on them is kept beside the record
def save_random_init(run: Run, ledger: Ledger, fitted: Fitted | None, src: Sources, *inputs) -> dict:
    if fitted is None:
        return {"none": True}
    ledger.write_tensors("random_init", fitted.result.head.state_dict())
    return {"head": head_config(src.task, fitted.result.head), "result": _result_record(fitted.result)}


def restore_random_init(run: Run, ex: Executor, ledger: Ledger, record: dict, src: Sources, stats, sel,
                        fits: Fits, prompts_fn):
    if record.get("none"):
        return None
    head = load_head(ledger.read_tensors("random_init"), record["head"])
    return Fitted(_result(record["result"], "ledger random_init", FixedPrompts(), head),
                  prompts=[prompts_fn(run, src, fits)])


# ---- full retraining: its store is the output (manifest last), the record its training report
def save_full_retrain(run: Run, ledger: Ledger, report: dict | None, *inputs) -> dict:
    return {"none": True} if report is None else {"report": report}


def full_retrain_path(run: Run) -> str:
    return join(run.output, "full-retrain-store")


def restore_full_retrain(run: Run, ex: Executor, ledger: Ledger, record: dict, *inputs):
    if record.get("none"):
        return None
    if not store_exists(full_retrain_path(run), run.cfg.storage):
        run.log(f"ledger full_retrain: no complete store at {full_retrain_path(run)}; full retraining runs again")
        return MUST_RUN
    return dict(record["report"])


# ---- evaluation, conversion, gate: figures (the conversion's store is exactly-once on its own)
def save_evaluation(run: Run, ledger: Ledger, ev: Evaluation, *inputs) -> dict:
    return {"methods": ev.methods, "reference": ev.reference}


def restore_evaluation(run: Run, ex: Executor, ledger: Ledger, record: dict, *inputs) -> Evaluation:
    return Evaluation(dict(record["methods"]), dict(record["reference"]))


def save_conversion(run: Run, ledger: Ledger, conv: Conversion, *inputs) -> dict:
    return {"target_store": conv.target_store, "summary": conv.summary, "choice": conv.choice}


def restore_conversion(run: Run, ex: Executor, ledger: Ledger, record: dict, *inputs) -> Conversion:
    target = run.cfg.target_store.format(output=run.output)
    if not store_exists(target, run.cfg.storage):  # the path from the config: a run folder may have moved
        run.log(f"ledger conversion: no complete store at {target}; the conversion runs again")
        return MUST_RUN
    shipped = record["choice"].get("shipped")
    if shipped not in ("puma", "linear") and not str(shipped).startswith("adapter_"):
        raise StoreError(f"ledger conversion: shipped {shipped!r} is not an adapter of this run")
    choice = {**record["choice"], "adapter": shipped_path(run, shipped)}
    return Conversion(target, dict(record["summary"]), choice)


def save_gate(run: Run, ledger: Ledger, checked: Gate, *inputs) -> dict:
    return {"summary": checked.summary}


def restore_gate(run: Run, ex: Executor, ledger: Ledger, record: dict, *inputs) -> Gate:
    return Gate(dict(record["summary"]))

