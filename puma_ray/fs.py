"""Paths that may be local or `s3://bucket/prefix`, opened through fsspec.

S3 endpoint and credentials come from the `storage` config section or, when absent, from the standard AWS
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), which s3fs/botocore read themselves.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field

import fsspec


@dataclass
class StorageOptions:
    endpoint_url: str | None = None  # None: botocore's default chain (AWS_ENDPOINT_URL, then AWS itself)
    key: str | None = field(default=None, repr=False)  # None: AWS_ACCESS_KEY_ID / instance profile
    secret: str | None = field(default=None, repr=False)  # never in a repr, a log line or an output file
    region: str | None = None  # None: AWS_REGION / the profile's (moto and MinIO accept any)

    def fsspec_kwargs(self) -> dict:
        kw: dict = {}
        if self.key:
            kw["key"] = self.key
        if self.secret:
            kw["secret"] = self.secret
        client = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client["endpoint_url"] = endpoint
        if self.region:
            client["region_name"] = self.region
        if client:
            kw["client_kwargs"] = client
        return kw


# ---- secrets: credentials never reach an output (report, manifest, adapter config, provenance, log line)
REDACTED = "***"
# keys whose values are credentials, wherever they sit in a config or record (storage.key, storage.secret, AWS_*)
_SECRET_KEYS = re.compile(r"^(key|secret|token|password|passwd|credentials?|session_token|security_token"
                          r"|access_key(_id)?|secret(_access)?_key)$|^aws_", re.I)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact_text(text: str) -> str:
    """`scheme://user:pass@host/...` → `scheme://***@host/...` anywhere in the text."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)


def redact(value):
    """A copy of a config / record with every credential masked: values under secret-looking keys (non-empty) and
    credentials inside URLs. What every file we write and every config we log goes through."""
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k) and v not in (None, "")
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def filesystem(path: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URL; S3 options apply only to s3:// paths."""
    protocol = path.split("://", 1)[0] if "://" in path else "file"
    kwargs = (storage or StorageOptions()).fsspec_kwargs() if protocol in ("s3", "s3a") else {}
    fs, inner = fsspec.core.url_to_fs(path, **kwargs)
    return fs, inner


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def plain_name(name, what: str, error: type[Exception] = ValueError) -> str:
    """`name` itself when it is a plain file name, what may be joined under a folder and stay inside it, locally
    and on S3 alike: a non-empty string without a path separator, not "." or "..", without control characters or
    surrounding blanks. Names read from artifacts (manifests, progress records, exports) are untrusted: anything
    else is one `error` naming `what` (the file and field it came from)."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or name != name.strip()
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise error(f"{what}: {name!r} is not a plain file name; a name read from an artifact must stay inside "
                    "its folder (tampered or corrupt artifact?)")
    return name


def child(folder: str, name, what: str, error: type[Exception] = ValueError) -> str:
    """folder/name, with `name` checked by plain_name: the one way a name read from an artifact becomes a path."""
    return join(folder, plain_name(name, what, error))


# a temporary file of an atomic write: "<dir>/.<name>.puma-tmp-<pid>-<random>"; a kill between write and rename
# leaves one behind, which a later run recognises as its own (never as a user's file) and removes
TEMP_MARK = ".puma-tmp-"


def is_temp_file(path: str) -> bool:
    """A leftover temporary file of our own atomic write (what a rerun may remove: we wrote it)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.startswith(".") and TEMP_MARK in name


def is_local_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def _named(e: OSError, path: str) -> OSError:
    """The same error, naming `path` (the file the user knows, not a temporary name)."""
    return OSError(e.errno, e.strerror or str(e), path)


def write_file(fs, path: str, data: bytes) -> None:
    """Writes a whole file atomically: readers see the old file (or none) or the whole new one, never a part.

    Locally: a temporary name in the same folder, flush + fsync, rename over `path` (a full disk or a kill leaves
    at most a temporary file, never a truncated manifest or progress record); object stores are atomic per object
    already. A failure (full disk, size limit, permissions) is an OSError naming `path`: what a job prints as its
    one error line."""
    if not is_local_fs(fs):
        try:
            with fs.open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise _named(e, path) from e
        return
    local = os.path.abspath(path.removeprefix("file://"))
    folder, name = os.path.split(local)
    tmp = os.path.join(folder, f".{name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # ours: the temporary file this call created
        raise _named(e, path) from e
    with contextlib.suppress(OSError):  # the rename itself durable: fsync the folder (not possible everywhere)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(fs, path: str, data, indent: int | None = 1) -> None:
    """A JSON document written atomically (write_file), credentials masked: every record, manifest and report."""
    write_file(fs, path, json.dumps(redact(data), indent=indent, default=str).encode())


def write_json_to(path: str, data, storage: StorageOptions | None = None) -> None:
    """write_json at a path (local or s3://), its local folder made first."""
    fs, inner = filesystem(path, storage)
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(fs, inner, data)


def read_json(fs, path: str, what: str, error: type[Exception] = ValueError):
    """A JSON document we wrote, read back; an unreadable one (truncated by an older version's non-atomic write,
    or not JSON at all) is one `error` naming `what`, never a JSONDecodeError traceback."""
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what}: unreadable JSON ({type(e).__name__}: {e})") from None


def stamp(path: str, storage: StorageOptions | None = None) -> list:
    """What identifies the bytes at `path` without reading them: (name, size, ETag or modification time) of the
    file, or of every file under the folder, sorted: a resumable run over input files names its state by this."""
    fs, root = filesystem(path, storage)
    if not fs.exists(root):
        return []
    infos = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
    return sorted([name[len(root):], info.get("size"), str(info.get("ETag") or info.get("mtime") or "")]
                  for name, info in infos.items())


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def absolute(path: str) -> str:
    """A local path made absolute (a Ray worker or Tune trial runs in a working directory of its own); a URL as is."""
    return path if is_remote(path) else os.path.abspath(path)


def location(path: str) -> str:
    """A comparable form of a folder: the real absolute path locally, the URL without its trailing / remotely."""
    if is_remote(path):
        return path.replace("s3a://", "s3://", 1).rstrip("/")
    return os.path.realpath(os.path.abspath(path.removeprefix("file://")))


def relation(inner: str, outer: str) -> str | None:
    """How folder `inner` stands to folder `outer`: "is", "contains" (outer sits inside it), "is inside", or
    None when they are apart. What every output check uses: an output never overlaps what it reads."""
    a, b = location(inner), location(outer)
    return ("is" if a == b else "contains" if b.startswith(a + "/") else "is inside" if a.startswith(b + "/")
            else None)


def pyarrow_filesystem(path: str, storage: StorageOptions | None = None):
    """(pyarrow filesystem, path without scheme) for Ray Data / Ray Train storage; None fs for local paths."""
    if not path.startswith(("s3://", "s3a://")):
        return None, os.path.abspath(path.removeprefix("file://"))
    from urllib.parse import urlparse

    import pyarrow.fs as pafs
    so = storage or StorageOptions()
    endpoint = so.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        url = urlparse(endpoint)
        kwargs.update(endpoint_override=url.netloc or url.path, scheme=url.scheme or "https")
    if so.key:
        kwargs.update(access_key=so.key, secret_key=so.secret)
    if so.region:
        kwargs["region"] = so.region
    return pafs.S3FileSystem(**kwargs), path.split("://", 1)[1]
