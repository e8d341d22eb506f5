"""What every job does the same way: config loading with CLI overrides, run folders, reports, CPU threads."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import signal

import torch

from puma_ray import __version__
from puma_ray.artifacts.formats import REPORT_FORMATS
from puma_ray.config import ConfigError, from_dict, load_yaml, parse_yaml, shown
from puma_ray.errors import PumaError
from puma_ray.fs import is_remote, join, redact, redact_text, write_json_to

MAX_OVERRIDE_CHARS = 10_000  # a command-line value; a longer one is a mistake (or a file pasted in)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` pairs (value parsed as YAML) applied onto a nested config dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {shown(item)} must look like key.sub=value")
        key, raw = item.split("=", 1)
        if len(item) > MAX_OVERRIDE_CHARS:
            raise ConfigError(f"override {shown(item)} is longer than {MAX_OVERRIDE_CHARS} characters")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {shown(item)}: {part} is not a section")
        node[parts[-1]] = parse_yaml(raw, f"override {shown(item)}")  # the files' safe, bounded loader
    return data


def _default_text(f) -> str:
    import dataclasses
    if f.default is not dataclasses.MISSING:
        return f" = {shown(f.default)}"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) else f" = {shown(value)}"
    return " (required)"


def config_sections(cls) -> str:
    """The config's fields, one line each with type, default, meaning (the comment beside the field in the source)
    and allowed values; nested sections indented: what --help lists."""
    import dataclasses
    import textwrap
    import typing

    from puma_ray.config import field_choices, field_docs

    def describe(c, indent: str) -> list[str]:
        hints, lines, docs = typing.get_type_hints(c), [], field_docs(c)
        for f in dataclasses.fields(c):
            if not f.init:
                continue
            hint = hints[f.name]
            name = getattr(hint, "__name__", None) if isinstance(hint, type) else None
            text = name or re.sub(r"\b(?:typing|puma_ray(?:\.\w+)*)\.(\w+)", r"\1", str(hint))
            lines.append(f"{indent}{f.name}: {text}{_default_text(f)}")
            choices = field_choices(c, f.name, hint)
            meaning = docs.get(f.name, "") + (f" [one of: {', '.join(map(str, choices))}]" if choices else "")
            if meaning:
                lines += textwrap.wrap(meaning, 110, initial_indent=indent + "    ", subsequent_indent=indent + "    ")
            inner = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
            if inner and indent.count(" ") < 6:
                lines += describe(inner[0], indent + "  ")
        return lines
    return "\n".join(describe(cls, "  "))


def job_args(argv, doc: str, configs: str, override_example: str, default_config: str | None = None,
             config_cls: type | None = None, more_flags=None):
    """What every job's command line takes: --config, --output and key=value overrides; --help lists every
    config section and field (`config_cls`). `more_flags(parser)` adds a job's own flags."""
    import argparse
    epilog = f"config sections and fields (YAML keys; override any as key.sub=value):\n{config_sections(config_cls)}" \
        if config_cls is not None else None
    parser = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config_required = default_config is None
    parser.add_argument("--config", required=config_required,
                        help=f"YAML config (see {configs})"
                        + ("" if config_required else f"; default: {default_config}"))
    parser.add_argument("--output", help="run folder (local or s3://); default: a new folder under runs/")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective config (file + overrides, credentials masked) as YAML and exit")
    if more_flags is not None:
        more_flags(parser)
    parser.add_argument("overrides", nargs="*", help=f"config overrides, e.g. {override_example}")
    return parser.parse_args(argv)


def print_config(cfg) -> int:
    """--print-config: the config a job would run, every field with its value after the file and the overrides
    (the YAML loads back through the same job: `--config printed.yaml` runs the same thing); exit code 0."""
    import yaml

    from puma_ray.config import to_dict
    print(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False, width=120), end="")
    return 0


def load_job_config(cls, path: str, overrides: list[str] | None = None):
    """Config class `cls` from a YAML file with `key=value` overrides applied; ConfigError names the field."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(cls, data, path)


def new_run_dir(output: str | None, job: str) -> str:
    if output:
        return output
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{job}-{stamp}-{os.getpid()}")


write_json = write_json_to  # the jobs' name for it


def write_report(path: str, job: str, report: dict, storage=None) -> None:
    """A job's report.json, its format id first (formats.REPORT_FORMATS); `report` gets the id too, so that what
    the job goes on to show is what it wrote."""
    report["format"] = REPORT_FORMATS[job]
    write_json(path, {"format": report["format"], **report}, storage)


def provenance(cfg_dict: dict) -> dict:
    return {"package": f"puma_ray {__version__}", "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": redact(cfg_dict)}


def set_threads(threads: int | None) -> int:
    """torch intra-op threads; default: the CPUs this process may use. Oversubscribing (two busy processes each
    with all cores) made a tiny model's step 40x slower on 2 cores: set it to 1 per Ray worker."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def report_path(run_dir: str) -> str:
    return join(run_dir, "report.json")


def describe_error(e: BaseException) -> str:
    """One line for the user: the message (an OSError: its cause and the file), credentials masked."""
    if isinstance(e, OSError) and not isinstance(e, PumaError) and e.filename is not None:
        text = f"cannot use {e.filename}: {e.strerror or e}"  # e.g. a full disk or a size limit while writing
    else:
        text = str(e)
    return redact_text(" ".join(text.split()))


def user_errors_to_exit_code(body) -> int:
    """Runs `body()`; a PumaError (bad input the user can fix) or a failed read/write (OSError: a missing file, a
    full disk) is one `error:` line and exit 2. Whatever was half-written is not marked done (manifests and
    progress records are written last), so a rerun recovers."""
    import sys
    previous = _sigterm_as_interrupt()
    try:
        return body()
    except (PumaError, OSError) as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler, `kill`): one line, not a traceback
        print("interrupted: nothing half-written is marked done; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


INTERRUPTED_EXIT = 130  # the shell's code for a run stopped by SIGINT; SIGTERM ends the same way here


def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread, so a `kill` takes the same way out as Ctrl-C: one line,
    then exit_job shuts our Ray down (its worker processes go with it). Returns the previous handler (None when
    not on the main thread, where Python cannot install one)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, interrupt)


# the libraries whose internal messages (deprecations, token-auth notices, progress chatter) go to the log file
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "DeepSpeed", "deepspeed", "transformers",
                   "torch", "py.warnings", "fsspec", "s3fs", "botocore", "urllib3")


def library_logs_to_file(run_dir: str, job: str) -> str:
    """The console shows our progress: the libraries' log records and Python warnings go to
    `<run_dir>/logs/libraries.log` (a local folder under runs/ when the run folder is remote), and Ray's worker
    processes keep their output in Ray's own session logs instead of echoing it here (PUMA_RAY_LOG_TO_DRIVER=0,
    read by ray_layer/session.ensure_ray). Returns the log file's path, which the job prints once."""
    import logging
    import warnings
    folder = os.path.join("runs", f"{job}-{os.getpid()}-logs") if is_remote(run_dir) else os.path.join(run_dir, "logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "libraries.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # every warning once per place, into the file (not the console)
    _import_deepspeed_logger()
    # a process running several jobs (tests, a sweep's trials) closes the previous run's file once, not never
    previous = {h for name in LIBRARY_LOGGERS for h in logging.getLogger(name).handlers if h is not handler}
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    for old in previous:
        old.close()
    os.environ.setdefault("PUMA_RAY_LOG_TO_DRIVER", "0")
    _native_stderr_to(path)
    return path


def _import_deepspeed_logger() -> None:
    """DeepSpeed adds a stdout handler to its logger when first imported, and the driver imports it late and
    indirectly (accelerate's unwrap inside every `save_pretrained`: a foundation or tiny model written on first
    use), which would print its accelerator probe on the console. Imported here instead, so that the handlers set
    next replace that one; DS_ACCELERATOR first, which makes the probe's "Setting accelerator to CPU" warning an
    info record (Ray Train workers set their own, ray_layer/train.py)."""
    import importlib.util
    if importlib.util.find_spec("deepspeed") is None:
        return
    import torch
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed.utils.logging  # noqa: F401  (0.3 s after torch)


def _native_stderr_to(path: str) -> None:
    """File descriptor 2 → the log file, sys.stderr → the console (a duplicate of the old fd 2): what native code
    writes there (Ray's core worker logs errors such as "constructor arguments in the object store" for every
    actor-pool actor; processes this one starts inherit fd 2) lands in the file, while this process's own
    messages, errors and progress bars, written through sys.stderr, stay on the console."""
    import sys
    if sys.stderr is not sys.__stderr__:  # already redirected (a test's capture, a caller's choice): leave it
        return
    try:
        console = os.dup(2)
        log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:  # no fd 2 (a detached process): nothing to separate
        return
    sys.stderr.flush()
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = os.fdopen(console, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")


def exit_job(code: int) -> None:
    """Ends a job's process with `code`, skipping the interpreter's teardown: a process that used Ray or pyarrow
    threads sometimes aborted there with `terminate called without an active exception` (exit 134, about 1 run in
    15 of `jobs/convert.py --verify`) after printing its result, so a script that checks the exit code saw a
    failure. Ray (when this process started or joined one) is shut down first, and the output is flushed."""
    import sys
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
