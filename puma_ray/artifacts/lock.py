"""One writer per output: a conversion or an export holds `<output>/_lock` while it writes.

Two `jobs/convert.py` runs on one `--output` used to both exit 0, each claiming the store; an `--overwrite` run
started beside a running one finished first and the first then completed too. Now the second writer is refused
with one line naming the holder (pid, host, start), before it reads or writes anything.

Locally the lock is `flock` on the file: the kernel releases it when the holder dies (kill -9 included), so a
crashed run never blocks the next. On an object store (no flock) it is a lease: the file is created only if
absent (S3 `If-None-Match: *`), renewed by its holder every `LEASE_RENEW_S`, and taken over once it has not been
renewed for `LEASE_EXPIRY_S` (a dead holder); the holder removes it when done.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid

from puma_ray.artifacts.formats import OUTPUT_LOCK
from puma_ray.errors import StoreError
from puma_ray.fs import filesystem, is_local_fs, join

LEASE_RENEW_S = 20.0  # an object-store holder rewrites its lease this often
LEASE_EXPIRY_S = 120.0  # a lease not renewed for this long belongs to a dead holder: six missed renewals


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex,
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "renewed_at": time.time()}


def _describe(info) -> str:
    if not isinstance(info, dict):
        return "another run"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started_at')}"
            if info.get("pid") else "another run")


def _ours(data: bytes) -> bool:
    """Empty (just created) or a holder record this module wrote."""
    if not data:
        return True
    try:
        info = json.loads(data)
    except ValueError:
        return False
    return isinstance(info, dict) and {"pid", "host", "token"} <= set(info)


class OutputLock:
    """`with OutputLock(path, "conversion"):` — refuses (StoreError) while another writer holds `path`."""

    def __init__(self, path: str, what: str, storage=None):
        self.path, self.what = path, what
        self.fs, self.root = filesystem(path, storage)
        self.file = join(self.root, OUTPUT_LOCK)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.info = _holder()

    # ---- local: flock
    def _acquire_local(self) -> None:
        import fcntl
        local = os.path.abspath(self.file.removeprefix("file://"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        while True:
            fd = os.open(local, os.O_RDWR | os.O_CREAT, 0o644)
            holder = None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with contextlib.suppress(OSError, ValueError):
                    holder = json.loads(os.pread(fd, 4096, 0) or b"null")
                os.close(fd)
                raise StoreError(f"output {self.path} is being written by {_describe(holder)} "
                                 f"({self.what}); wait for it to finish, or write elsewhere") from None
            # the file may have been removed by its last holder between our open and our flock: lock the file
            # that is at the path now, or we would hold a lock nobody else can see
            try:
                same = os.stat(local).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if not _ours(os.pread(fd, 65536, 0)):  # a file of the user's that happens to be named _lock: not ours
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise StoreError(f"output {self.path} holds {OUTPUT_LOCK}, which puma_ray did not write; choose "
                             "another folder")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self.info).encode(), 0)
        except OSError as e:  # a full disk already: the error names the lock file, and the lock is let go
            with contextlib.suppress(OSError):
                os.remove(local)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise OSError(e.errno, e.strerror, self.file) from e
        self._fd, self._local = fd, local

    def _release_local(self) -> None:
        import fcntl
        with contextlib.suppress(OSError):
            os.remove(self._local)  # ours, removed while still held: the next writer creates a fresh one
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)

    # ---- object store: a lease created only if absent
    def _write_lease(self, mode: str) -> None:
        self.info["renewed_at"] = time.time()
        with self.fs.open(self.file, mode) as f:
            f.write(json.dumps(self.info).encode())

    def _acquire_remote(self) -> None:
        for _ in range(3):
            try:
                self._write_lease("xb")
                break
            except FileExistsError:
                try:
                    with self.fs.open(self.file, "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if not data or not _ours(data):
                    raise StoreError(f"output {self.path} holds {OUTPUT_LOCK}, which puma_ray did not write; "
                                     "choose another folder") from None
                holder = json.loads(data)
                age = time.time() - float(holder.get("renewed_at", 0)) if isinstance(holder, dict) else 1e9
                if age < LEASE_EXPIRY_S:
                    raise StoreError(f"output {self.path} is being written by {_describe(holder)} ({self.what}); "
                                     "wait for it to finish, or write elsewhere") from None
                with contextlib.suppress(FileNotFoundError):  # a dead holder's lease: ours to clear
                    self.fs.rm(self.file)
        else:
            raise StoreError(f"output {self.path}: could not take its lock {OUTPUT_LOCK} (contended); try again")
        self._renewer = threading.Thread(target=self._renew, daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
                self._write_lease("wb")

    def _release_remote(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.file)

    def __enter__(self) -> "OutputLock":
        (self._acquire_local if is_local_fs(self.fs) else self._acquire_remote)()
        return self

    def __exit__(self, *exc) -> None:
        (self._release_local if is_local_fs(self.fs) else self._release_remote)()
