"""Config dataclasses shared by the jobs, each validated in __post_init__, and strict YAML loading.

Unknown keys are errors that name the key and the file: a typo must not silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from puma_ray.errors import ConfigError
from puma_ray.fs import StorageOptions
from puma_ray.tasks import RATING_TEMPLATE, get_task


@dataclass
class FoundationConfig:
    """How `foundation:<family>` is pretrained on the job's dataset (recipes/foundation.py). Every field, the seed,
    the template and the train records determine the weights, and so the cache folder."""
    hidden_size: int = 64  # d: the demo's two foundations differ in width (48 vs 64), as real model generations do
    layers: int = 2  # 2 layers fit a 1-minute pretraining on 2 cores; depth bought no RMSE on ML-100K (measured)
    heads: int = 4  # attention heads: head width 12-16 at the demo widths 48/64
    vocab_size: int = 4096  # BPE over templates + train item texts: most title words become one token (item identity)
    prompt_length: int = 1  # throwaway per-user vectors in the user slot: the model learns to read a preference vector
    # over the train split; no early stopping: the valid split is never read. Measured on ML-100K (d=64, Eq. 1 of
    # the demo on top, test RMSE): 1 epoch 1.041, 2 epochs 1.034, 3 epochs 1.011 (docs/benchmarks.md)
    epochs: int = 3
    batch_size: int = 128  # ~1,600 records/s at d=64 on 2 cores; 64 and 256 were no faster per record
    lr: float = 3e-3  # AdamW on the model's weights, cosine to 0; 6e-3 and 1e-2 lost the item signal (RMSE ~1.07-1.16)
    user_lr: float = 2e-2  # the throwaway user vectors (in embedding-RMS units), each seen in few batches per epoch
    embedding_lr: float | None = None  # token embeddings (item words); None: lr (2e-2 helped valid, not test)
    warmup_frac: float = 0.0  # linear warm-up over this fraction of the steps, then cosine to 0
    weight_decay: float = 0.01  # AdamW's usual small decay for a from-scratch transformer
    max_train_records: int | None = None  # cap per epoch (sampled): big datasets pretrain on a sample
    # input/output embeddings tied or not; None: the family's own choice (Qwen2 and Gemma3 tie). A tied output row of
    # a label token ("4") is also the input embedding of that digit in every title's year ("(1995)")
    tie_embeddings: bool | None = None
    # share of records whose user vector is zeroed in a step: the model must learn the items' own signal, which a
    # per-user vector alone can stand in for (some seeds ended at the per-user mean's level: docs/benchmarks.md)
    user_dropout: float = 0.0
    # one added token per train item ("<item:ID>", read before the item's text): the model learns each item as an
    # entity, as a real LLM knows a famous title as a whole, not only from its words spread over several BPE
    # tokens. Measured on ML-100K (3 epochs, then Eq. 1 3 x 40k, test RMSE; bias baseline 1.0075): llama d=64
    # 1.0101 → 1.0035, qwen2 d=96 1.1124 → 1.0432 (docs/benchmarks.md)
    item_tokens: bool = True

    def __post_init__(self):
        for name in ("hidden_size", "layers", "heads", "vocab_size", "prompt_length", "epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"model.foundation.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.vocab_size < 300:
            raise ConfigError("model.foundation.vocab_size must be >= 300 (the byte alphabet + special tokens)")
        if self.lr <= 0 or self.user_lr <= 0:
            raise ConfigError("model.foundation.lr and user_lr must be > 0")
        if not 0.0 <= self.user_dropout < 1.0:
            raise ConfigError(f"model.foundation.user_dropout must be in [0, 1), got {self.user_dropout}")


# the families tiny:<family> and foundation:<family> build (models/tiny.py FAMILIES: a test keeps them equal);
# named here so a config is refused when it is read, without importing transformers
MODEL_FAMILIES = ("gemma3", "llama", "phi3", "qwen2", "stablelm")


@dataclass
class ModelConfig:
    # hub id, local folder, "tiny:<family>" (a tiny random model the package builds and caches locally), or
    # "foundation:<family>" (a small model of that family pretrained on the job's train split, then frozen)
    name: str = "tiny:llama"
    revision: str | None = None  # a hub id's commit/tag, resolved in the local HF cache only (no downloads)
    # CPU: float32; GPUs: bfloat16 (the LLM is frozen, so precision only costs accuracy)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0  # weights of tiny:<family> and foundation:<family> models
    foundation: FoundationConfig | None = None  # foundation:<family> only; None: FoundationConfig's defaults
    # keys/values of the template's fixed prefix kept per process (models/prefix_cache.py): a few KB for the paper's
    # wording, ~60 MB item-first on ML-100K's 2-layer foundations; 0 turns the cache off
    prefix_cache_mib: int = 1024
    # where *this process* runs the model (Eq. 1 in process, evaluation, selection statistics, local fits): "cpu",
    # "cuda", "cuda:N", or "auto" (cuda when torch sees one). Ray Train workers and actors place their own copies
    # (engine.use_gpu, engine.gpus_per_actor). Prompt tables, adapters and heads stay on the CPU: per step only the
    # batch's prompts (batch x l x d) and label logits (batch x 5) cross over
    device: str = "cpu"

    def __post_init__(self):
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device):
            raise ConfigError(f"model.device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        kind, _, family = self.name.partition(":")
        if kind in ("tiny", "foundation") and family not in MODEL_FAMILIES:
            raise ConfigError(f"model.name {self.name!r}: unknown family {family!r}; known: {sorted(MODEL_FAMILIES)}")
        if self.foundation is not None and not self.name.startswith("foundation:"):
            raise ConfigError(f"model.foundation is set but model.name {self.name!r} is not foundation:<family>")


@dataclass
class DataConfig:
    # the allowed names (data.LOADERS) are registered by the data package, which imports this module
    CHOICES: typing.ClassVar[dict] = {}
    name: str = "movielens100k"  # which loader reads the data (puma_ray/data): a packaged dataset or your files
    paths: dict[str, str] = field(default_factory=dict)  # loader-specific files, e.g. {"reviews": ..., "meta": ...}
    max_users: int | None = None  # keep the first N users (sorted id order): small runs on big data
    valid_frac: float = 0.1  # each user's latest records after train: early stopping / model choice
    test_frac: float = 0.1  # each user's latest records: reported metrics only
    options: dict = field(default_factory=dict)  # loader keyword arguments (filters, synthetic sizes, ...)

    def __post_init__(self):
        if self.max_users is not None and self.max_users < 1:
            raise ConfigError(f"data.max_users must be >= 1, got {self.max_users}")
        if not (0 < self.test_frac < 1 and 0 <= self.valid_frac < 1 and self.valid_frac + self.test_frac < 1):
            raise ConfigError(f"data.valid_frac={self.valid_frac}, test_frac={self.test_frac}: need fractions < 1")


@dataclass
class TemplateConfig:
    text: str = RATING_TEMPLATE  # the paper's wording; placeholders below are filled per record
    labels: list[str] = field(default_factory=lambda: ["1", "2", "3", "4", "5"])  # read out at the answer position
    user_placeholder: str = "<UserID>"  # becomes l positions holding the user's prompt vectors
    item_placeholder: str = "<ItemTitle>"  # where the item's text goes in the template
    history_placeholder: str = "<History>"  # where the user's recent items go (CTR templates)
    max_item_tokens: int = 32  # item text is cut, the answer cue never is
    max_history_tokens: int = 96  # CTR history keeps the most recent titles that fit
    # a named wording of the task's template instead of `text`: "paper" (Section 4.1) or "item_first" (the same
    # words with the user's feature last: the prefix cache then computes all but ~5 positions once per item)
    wording: Literal["paper", "item_first"] | None = None

    def __post_init__(self):
        if self.text.count(self.user_placeholder) != 1:
            raise ConfigError(f"template.text must hold {self.user_placeholder} exactly once")
        if self.text.count(self.item_placeholder) != 1:
            raise ConfigError(f"template.text must hold {self.item_placeholder} exactly once")
        if not self.labels:
            raise ConfigError("template.labels must name at least one label token")

    @classmethod
    def for_task(cls, task: str, wording: str = "paper") -> "TemplateConfig":
        spec = get_task(task)
        return cls(text=spec.wording(wording), labels=list(spec.labels), wording=wording)


def task_template(template: TemplateConfig | None, task: str) -> TemplateConfig:
    """The template a job uses: the task's paper wording when none is configured; a configured `wording` filled
    with that task's text and labels (its other fields kept); else the configured text as it is."""
    if template is None:
        return TemplateConfig.for_task(task)
    if template.wording is None:
        return template
    spec = get_task(task)
    return dataclasses.replace(template, text=spec.wording(template.wording), labels=list(spec.labels))


@dataclass
class PromptTrainConfig:
    prompt_length: int = 1  # l: the paper uses 1 vector per user
    lr: float = 1e-2  # Adam on prompts in units of the model's token-embedding RMS (scale-free across families)
    head_lr: float = 3e-3  # the 601-parameter head sees every batch, so it needs less
    epochs: int = 15  # the paper's prompt pre-training length
    patience: int = 4  # early stop on validation, as the paper
    batch_size: int = 64  # records per step: one prompt row each, so small batches touch many users
    eval_batch_size: int = 256  # no backward: larger batches are free
    init_scale: float = 1.0  # initial prompt RMS, relative to token embeddings (paper: uniform(-0.1, 0.1) raw)
    clip: float = 8.0  # prompt values stay within +-clip token-embedding RMS, or one user can drown the template
    seed: int = 0  # initial prompts and record sampling: a store is reproducible from its config
    max_train_records: int | None = None  # cap per epoch (sampled), for quick runs on large data
    # one prompt for every user, trained the same way: the control that shows whether the personalization is in
    # the per-user prompts or already in the (pretrained) foundation
    shared: bool = False

    def __post_init__(self):
        if not isinstance(self.shared, bool):
            raise ConfigError(f"train.shared must be true or false, got {self.shared!r}")
        for name in ("prompt_length", "epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ConfigError("train.lr and train.head_lr must be > 0")
        if self.patience < 0:
            raise ConfigError(f"train.patience must be >= 0, got {self.patience}")


@dataclass
class StoreConfig:
    shard_rows: int = 65_536  # rows per prompt shard: ~150 MB at l*d = 576, small enough to stream
    overwrite: bool = False  # replace an existing store at the output path (never a folder we did not write)

    def __post_init__(self):
        if self.shard_rows < 1:
            raise ConfigError(f"store.shard_rows must be >= 1, got {self.shard_rows}")


@dataclass
class EngineConfig:
    """Where fits run. The core never reads this beyond `kind`; the Ray layer reads the rest."""
    # "ray": Ray Train workers with a DeepSpeed engine; "local": the same loop in this process
    kind: Literal["ray", "local"] = "ray"
    address: str | None = None  # Ray cluster address; None: RAY_ADDRESS (ray job submit sets it) or a local Ray
    num_workers: int = 1  # Train workers (data parallel); one per GPU on a GPU cluster
    use_gpu: bool = False  # one GPU per Train worker; False on CPU clusters and in tests
    cpus_per_worker: float = 1.0  # leave CPU for Ray Data's read tasks, or a 2-CPU machine deadlocks
    threads_per_worker: int = 1  # torch threads per worker: oversubscribing cores slows tiny models 40x
    zero_stage: int = 2  # DeepSpeed ZeRO stage (0-3); 2 partitions optimizer state + gradients
    # "fp32" on CPU; "bf16" on A100s
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # "fused_adam" on GPUs; "cpu_adam" compiles DeepSpeed's op (~60 s first time)
    optimizer: Literal["torch_adamw", "fused_adam", "cpu_adam"] = "torch_adamw"
    storage_path: str | None = None  # checkpoints (adapter + head + optimizer, never the LLM); None: <output>/train
    run_name: str | None = None  # a rerun with the same name + storage resumes from the latest checkpoint
    max_failures: int = 2  # worker failures retried from the last checkpoint
    local_cpus: int | None = None  # CPUs of an in-process local Ray; None: all
    # "full": the driver reads the records and prompts (small data, every strategy and baseline); "lean": the
    # driver holds per-user rows and the fit users' data, the rest runs on actors (millions of users; parquet data)
    driver: Literal["full", "lean"] = "full"
    actors: int = 2  # lean driver: actor-pool size of the test evaluation and the selection's shard pass
    # fractional: an actor pool holding every CPU starves Ray Data's read and shuffle tasks (a silent hang)
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0  # lean driver: GPUs per evaluation actor (each holds the frozen model)

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError(f"engine.num_workers must be >= 1, got {self.num_workers}")
        if self.actors < 1:
            raise ConfigError(f"engine.actors must be >= 1, got {self.actors}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"engine.zero_stage must be 0..3, got {self.zero_stage}")


def from_dict(cls, data: dict | None, where: str):
    """Builds dataclass `cls` from a mapping, every field converted and checked against its type hint (nested
    dataclasses, `X | None`, `list[X]`, `dict[str, X]`, `Literal[...]`, bool/int/float/str); an unknown key or a
    value of the wrong type is a ConfigError naming the field (`where.key`)."""
    if isinstance(data, cls):
        return data
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {shown(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        near = {k: difflib.get_close_matches(k, sorted(names), 1) for k in unknown}
        hint = "; ".join(f"did you mean {m[0]!r} for {k!r}?" for k, m in near.items() if m)
        raise ConfigError(f"{where}: unknown key(s) {unknown}; {hint + '; ' if hint else ''}known: {sorted(names)}")
    kwargs = {key: convert_value(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field missing
        raise ConfigError(f"{where}: {e}") from e


def convert_value(hint, value, where: str):
    """`value` as type `hint` (see from_dict); ConfigError naming `where` when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:
            try:
                return convert_value(option, value, where)
            except ConfigError:
                pass
        return convert_value(options[-1], value, where)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where} must be one of {list(args)}, got {shown(value)}")
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {shown(value)}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where} must hold {len(args)} values, got {len(value)}")
        kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return tuple(convert_value(k, v, f"{where}[{i}]") for i, (k, v) in enumerate(zip(kinds, value))) \
            if args else tuple(value)
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {shown(value)}")
        return [convert_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {shown(value)}")
        return {k: convert_value(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {shown(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {shown(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # an int stays an int (PEP 484's numeric tower): a budget of 1 user is not 100%
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string: take it when it is a number
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {shown(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {type(value).__name__} {shown(value)}")
    return value


# ---- bounded, one-line config reading: a config is input like any other file
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: the largest shipped config is ~3 KB; anything near this is not a config
MAX_CONFIG_NODES = 100_000  # values after alias expansion: a YAML alias bomb expands exponentially (2.6 GB seen)
_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxlevel = 60, 60, 4, 4, 3


def shown(value) -> str:
    """A value as an error message shows it: repr, truncated (an expanded alias bomb must not be formatted)."""
    text = _SHOWN.repr(value)  # reprlib stops at a few items and levels: a bomb is never expanded
    return text if len(text) <= 120 else text[:117] + "..."


def _check_size(data, where: str) -> None:
    """Refuses a document whose values, aliases expanded, exceed MAX_CONFIG_NODES (counted with a budget, so the
    walk stops early: a bomb is never expanded)."""
    budget, stack = MAX_CONFIG_NODES, [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} values once YAML aliases are expanded "
                              "(an alias bomb?); refusing it")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{at}".split())


def parse_yaml(text: str, where: str):
    """`text` as YAML with the safe loader (no Python tags, no object construction), size-checked; every failure
    is one ConfigError line naming `where` (a file, or an override)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:  # the parser recurses per nesting level: "[[[[..." thousands deep
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    _check_size(data, where)
    return data


def load_yaml(path: str) -> dict:
    """A config file: at most MAX_CONFIG_BYTES of UTF-8 text (a binary file is refused, not decoded), parsed by
    parse_yaml; the top level must be a mapping."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder, not a YAML file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes: not a config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): not a YAML config") from None
    if "\x00" in text:
        raise ConfigError(f"config file {path} holds NUL bytes: a binary file, not a YAML config")
    data = parse_yaml(text, f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


# ---- what --help shows of a config class: every field's default and meaning (its comment in the source)
def field_docs(cls) -> dict[str, str]:
    """{field: its comment} read from the class's source: the comment on the field's line, else the comment lines
    right above it. The meanings live once, next to the defaults (nanoGPT's why-comments); --help shows them."""
    import inspect
    import io
    import tokenize
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    fields_at: dict[int, str] = {}
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and tok.start[0] not in fields_at:
            fields_at[tok.start[0]] = tok.string
    docs = {}
    for line, name in fields_at.items():
        if line in comments:
            docs[name] = comments[line]
            continue
        above, row = [], line - 1
        while row in comments and row not in fields_at:
            above.insert(0, comments[row])
            row -= 1
        if above:
            docs[name] = " ".join(above)
    return docs


def field_choices(cls, name: str, hint) -> list | None:
    """The values a field may take: a Literal's, or those its class names in CHOICES (a registry, read lazily)."""
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    provider = getattr(cls, "CHOICES", {}).get(name)
    return list(provider()) if provider else None


def to_dict(cfg):
    """The plain (YAML/JSON) form of a config: what from_dict reads back to an equal config. Derived fields
    (init=False) are left out."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


__all__ = ["ConfigError", "EngineConfig", "FoundationConfig", "ModelConfig", "DataConfig", "TemplateConfig",
           "PromptTrainConfig", "StoreConfig",
           "StorageOptions", "from_dict", "load_yaml", "parse_yaml", "shown", "to_dict"]
