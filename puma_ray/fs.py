"""Paths that may be local or `s3://bucket/prefix`, opened through fsspec.

S3 endpoint and credentials come from the `storage` config section or, when absent, from the standard AWS
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), which s3fs/botocore read themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec


@dataclass
class StorageOptions:
    endpoint_url: str | None = None  # None: botocore's default chain (AWS_ENDPOINT_URL, then AWS itself)
    key: str | None = None  # None: AWS_ACCESS_KEY_ID / instance profile
    secret: str | None = None
    region: str | None = None

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


def filesystem(path: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or URL; S3 options apply only to s3:// paths."""
    protocol = path.split("://", 1)[0] if "://" in path else "file"
    kwargs = (storage or StorageOptions()).fsspec_kwargs() if protocol in ("s3", "s3a") else {}
    fs, inner = fsspec.core.url_to_fs(path, **kwargs)
    return fs, inner


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


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
