"""Versioned model store: a local directory or an S3 bucket, one interface.

Layout under the root (directory or s3://bucket/prefix):

    <model_name>/v0001/model.keras, labels.json, metrics.json, card.json
    <model_name>/latest.json      -> newest *complete* version

A version number is claimed atomically (mkdir locally, a conditional put of the
card with If-None-Match: * on S3), so concurrent publishers never share one; the
latest pointer only moves forward and only after all files are written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from hemaflow.progress import Progress

from hemaflow.model_folder import CARD_FILE, MODEL_FILE, sha256_file  # noqa: E402,F401  (re-exported)
LATEST_FILE = "latest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TAG_RE = re.compile(r"^v(\d{4,})$")
_MAX_CLAIM_ATTEMPTS = 1000


class StoreError(Exception):
    """A store operation failed. Message: '<url or key>: <problem>'."""

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


class StoreNotFoundError(StoreError):
    """No such bucket, model, version or file."""


class StoreIntegrityError(StoreError):
    """A pulled file does not match the sha256 recorded in its card."""


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    uri: str
    sha256: str  # of model.keras
    card: dict[str, Any] = field(repr=False)

    @property
    def tag(self) -> str:
        return version_tag(self.version)


def version_tag(version: int) -> str:
    """1 -> 'v0001' (sorts as text up to 9999, still parses beyond)."""
    return f"v{version:04d}"


def parse_version(spec: str | int) -> int | None:
    """'latest' -> None; 3, '3', 'v3', 'v0003' -> 3; anything else -> ValueError."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        number = spec
    elif isinstance(spec, str) and spec.strip().lower() == "latest":
        return None
    elif isinstance(spec, str) and re.fullmatch(r"v?\d+", spec.strip()):
        number = int(spec.strip().lstrip("v"))
    else:
        raise ValueError(f"version must be 'latest', an int or 'vNNNN', got {spec!r}")
    if number < 1:
        raise ValueError(f"versions start at 1, got {spec!r}")
    return number


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"model name must match {_NAME_RE.pattern}, got {name!r}")
    return name


def hash_files(files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """{name: {sha256, bytes}} for the files to publish; checks names and presence."""
    if MODEL_FILE not in files:
        raise ValueError(f"publish needs a {MODEL_FILE!r} entry in files, got {sorted(files)}")
    entries = {}
    for fname, path in files.items():
        if "/" in fname or fname in ("", ".", "..", CARD_FILE, LATEST_FILE):
            raise ValueError(f"file names must be plain, not {CARD_FILE!r}/{LATEST_FILE!r}, got {fname!r}")
        path = Path(path)
        if not path.is_file():
            raise StoreError(str(path), f"file to publish as {fname!r} not found")
        entries[fname] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def _build_card(name: str, version: int, entries: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    """The caller's card plus what the store vouches for: version, hashes, time."""
    return {
        **card,
        "name": name,
        "version": version,
        "tag": version_tag(version),
        "sha256": entries[MODEL_FILE]["sha256"],
        "files": entries,
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _pointer(mv_card: dict[str, Any], uri: str) -> dict[str, Any]:
    return {"name": mv_card["name"], "version": mv_card["version"], "tag": mv_card["tag"],
            "sha256": mv_card["sha256"], "uri": uri,
            "updated_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress:
        progress(done, total)


class ModelStore(ABC):
    """publish / latest / list_versions / pull, whatever the backend."""

    url: str

    # --- backend primitives -------------------------------------------------
    @abstractmethod
    def _model_uri(self, name: str) -> str: ...

    def _version_uri(self, name: str, version: int) -> str:
        return f"{self._model_uri(name)}/{version_tag(version)}"

    @abstractmethod
    def _claimed_versions(self, name: str) -> list[int]:
        """Version numbers whose card exists, ascending."""

    @abstractmethod
    def _read_card(self, name: str, version: int) -> dict[str, Any] | None: ...

    @abstractmethod
    def _read_pointer(self, name: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def _publish_files(self, name: str, files: dict[str, Path], entries: dict[str, Any],
                       card: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
        """Claim the next free version, write files + card; return the final card."""

    @abstractmethod
    def _advance_pointer(self, name: str, card: dict[str, Any]) -> None:
        """Point latest.json at card's version unless it already points further."""

    @abstractmethod
    def _fetch(self, name: str, version: int, fname: str, dest_path: Path) -> None: ...

    # --- public interface ---------------------------------------------------
    def publish(self, model_name: str, files: dict[str, Path], card: dict[str, Any],
                progress: Progress | None = None) -> ModelVersion:
        """Store files as the next version of model_name and make it the latest."""
        _check_name(model_name)
        files = {fname: Path(path) for fname, path in files.items()}
        entries = hash_files(files)
        final = self._publish_files(model_name, files, entries, card, progress)
        self._advance_pointer(model_name, final)
        return self._as_version(model_name, final)

    def latest(self, model_name: str) -> ModelVersion | None:
        """Newest complete version, or None if nothing was published yet."""
        _check_name(model_name)
        pointer = self._read_pointer(model_name)
        if pointer is None:
            return None
        card = self._read_card(model_name, int(pointer["version"]))
        if card is None:
            raise StoreNotFoundError(self._version_uri(model_name, int(pointer["version"])),
                                     f"{LATEST_FILE} points at a version whose {CARD_FILE} is missing")
        return self._as_version(model_name, card)

    def list_versions(self, model_name: str) -> list[ModelVersion]:
        """Every claimed version, oldest first (may include one still uploading)."""
        _check_name(model_name)
        out = []
        for number in self._claimed_versions(model_name):
            card = self._read_card(model_name, number)
            if card is not None:
                out.append(self._as_version(model_name, card))
        return out

    def pull(self, model_name: str, version: str | int, dest_dir: Path,
             progress: Progress | None = None) -> Path:
        """Download a version's files (and card.json) into dest_dir, sha256-checked."""
        _check_name(model_name)
        mv = self._resolve(model_name, version)
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        files = mv.card.get("files") or {MODEL_FILE: {"sha256": mv.sha256}}
        total = len(files)
        _report(progress, 0, total)
        for done, (fname, meta) in enumerate(sorted(files.items()), start=1):
            part = dest_dir / f".{fname}.part"
            self._fetch(model_name, mv.version, fname, part)
            actual = sha256_file(part)
            if actual != meta["sha256"]:
                part.unlink(missing_ok=True)
                raise StoreIntegrityError(
                    f"{mv.uri}/{fname}",
                    f"sha256 mismatch: card says {meta['sha256']}, stored file has {actual} "
                    "(corrupted or replaced after publishing; not kept)")
            os.replace(part, dest_dir / fname)
            _report(progress, done, total)
        (dest_dir / CARD_FILE).write_text(json.dumps(mv.card, indent=2, sort_keys=True) + "\n")
        return dest_dir

    # --- shared helpers -----------------------------------------------------
    def _as_version(self, name: str, card: dict[str, Any]) -> ModelVersion:
        number = int(card["version"])
        return ModelVersion(name=name, version=number, uri=self._version_uri(name, number),
                            sha256=card["sha256"], card=card)

    def _resolve(self, name: str, spec: str | int) -> ModelVersion:
        try:
            number = parse_version(spec)
        except ValueError as exc:
            raise StoreError(self._model_uri(name), str(exc)) from exc
        if number is None:
            mv = self.latest(name)
            if mv is None:
                raise self._missing(name, "latest")
            return mv
        card = self._read_card(name, number)
        if card is None:
            raise self._missing(name, version_tag(number))
        return self._as_version(name, card)

    def _missing(self, name: str, tag: str) -> StoreNotFoundError:
        claimed = self._claimed_versions(name)
        if not claimed:
            return StoreNotFoundError(self._model_uri(name),
                                      f"no such model {name!r} in {self.url} (nothing published)")
        have = ", ".join(version_tag(v) for v in claimed)
        if tag == "latest":
            return StoreNotFoundError(self._model_uri(name),
                                      f"no complete version of {name!r} yet (claimed: {have})")
        return StoreNotFoundError(f"{self._model_uri(name)}/{tag}",
                                  f"no such version {tag} of model {name!r} (published: {have})")


# ---------------------------------------------------------------------------
class LocalStore(ModelStore):
    """Directory store; mkdir claims a version, a lock file guards latest.json."""

    def __init__(self, root_dir: Path, url: str | None = None):
        self.root_dir = Path(root_dir).expanduser().resolve()
        self.url = url or str(self.root_dir)

    def _model_uri(self, name: str) -> str:
        return str(self.root_dir / name)

    def _claimed_versions(self, name: str) -> list[int]:
        model_dir = self.root_dir / name
        if not model_dir.is_dir():
            return []
        found = []
        for child in model_dir.iterdir():
            m = _TAG_RE.match(child.name)
            if m and (child / CARD_FILE).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise StoreError(str(path), f"not valid JSON: {exc}") from exc

    def _read_card(self, name: str, version: int) -> dict[str, Any] | None:
        return self._read_json(self.root_dir / name / version_tag(version) / CARD_FILE)

    def _read_pointer(self, name: str) -> dict[str, Any] | None:
        return self._read_json(self.root_dir / name / LATEST_FILE)

    def _publish_files(self, name, files, entries, card, progress):
        model_dir = self.root_dir / name
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(self.url, f"cannot create store directory: {exc}") from exc
        existing = [int(m.group(1)) for c in model_dir.iterdir() if (m := _TAG_RE.match(c.name))]
        number = max(existing, default=0) + 1
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            try:
                (model_dir / version_tag(number)).mkdir()  # atomic claim
                break
            except FileExistsError:
                number += 1
        else:
            raise StoreError(self._model_uri(name), "could not claim a free version number")
        version_dir = model_dir / version_tag(number)
        final = _build_card(name, number, entries, card)
        total = len(files)
        try:
            _report(progress, 0, total)
            for done, (fname, path) in enumerate(files.items(), start=1):
                shutil.copyfile(path, version_dir / fname)
                _report(progress, done, total)
            # card last: its presence marks the version complete
            with open(version_dir / CARD_FILE, "x") as fh:
                fh.write(json.dumps(final, indent=2, sort_keys=True) + "\n")
        except BaseException:
            shutil.rmtree(version_dir, ignore_errors=True)  # free the half-written claim
            raise
        return final

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with open(self.root_dir / name / ".latest.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _advance_pointer(self, name, card):
        pointer_path = self.root_dir / name / LATEST_FILE
        with self._locked(name):
            current = self._read_pointer(name)
            if current and int(current["version"]) >= card["version"]:
                return
            fd, tmp = tempfile.mkstemp(dir=pointer_path.parent, prefix=".latest.")
            with os.fdopen(fd, "w") as fh:
                json.dump(_pointer(card, self._version_uri(name, card["version"])), fh, indent=2)
            os.replace(tmp, pointer_path)

    def _fetch(self, name, version, fname, dest_path):
        src = self.root_dir / name / version_tag(version) / fname
        if not src.is_file():
            raise StoreNotFoundError(str(src), "file listed in the card is missing from the store")
        shutil.copyfile(src, dest_path)


# ---------------------------------------------------------------------------
class S3Store(ModelStore):
    """s3://bucket/prefix through boto3; honours AWS_ENDPOINT_URL(_S3) for MinIO/moto."""

    def __init__(self, bucket: str, prefix: str = "", url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = url or f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        session = boto3.session.Session()
        self._client = session.client(
            "s3", region_name=session.region_name or "us-east-1",
            config=Config(connect_timeout=10, read_timeout=60))

    # keys and uris
    def _key(self, *parts: str) -> str:
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _model_uri(self, name: str) -> str:
        return self._uri(self._key(name))

    # error translation: every failure names the key and says what to do
    def _error(self, exc: Exception, key: str | None) -> StoreError:
        from botocore.exceptions import (ClientError, EndpointConnectionError,
                                         NoCredentialsError, PartialCredentialsError)

        where = self._uri(key) if key else self.url
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(where, "AWS credentials missing: set AWS_ACCESS_KEY_ID and "
                                     "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(exc, EndpointConnectionError):
            return StoreError(where, f"cannot reach the S3 endpoint: {exc}")
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                return StoreNotFoundError(where, f"no such bucket {self.bucket!r}")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StoreNotFoundError(where, "no such key")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StoreError(where, f"access denied ({code}): check the credentials and "
                                         "the bucket policy")
            if code == "NotImplemented":
                return StoreError(where, "the S3 server does not support conditional writes "
                                         "(If-None-Match / If-Match), needed to allocate versions safely")
            return StoreError(where, f"S3 error {code}: {exc}")
        return StoreError(where, f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _code(exc: Exception) -> str:
        resp = getattr(exc, "response", None) or {}
        return str(resp.get("Error", {}).get("Code", ""))

    def _get_json(self, key: str) -> tuple[dict[str, Any], str] | None:
        """(document, etag) or None if the key does not exist; other errors raise."""
        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=key)
            body = obj["Body"].read()
        except Exception as exc:
            if self._code(exc) == "NoSuchKey":
                return None
            raise self._error(exc, key) from exc
        try:
            return json.loads(body), obj["ETag"]
        except json.JSONDecodeError as exc:
            raise StoreError(self._uri(key), f"not valid JSON: {exc}") from exc

    def _claimed_versions(self, name: str) -> list[int]:
        found = []
        paginator = self._client.get_paginator("list_objects_v2")
        prefix = self._key(name) + "/"
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for cp in page.get("CommonPrefixes", []):
                    m = _TAG_RE.match(cp["Prefix"][len(prefix):].rstrip("/"))
                    if m:
                        found.append(int(m.group(1)))
        except Exception as exc:
            raise self._error(exc, prefix) from exc
        return sorted(found)

    def _read_card(self, name, version):
        got = self._get_json(self._key(name, version_tag(version), CARD_FILE))
        return got[0] if got else None

    def _read_pointer(self, name):
        got = self._get_json(self._key(name, LATEST_FILE))
        return got[0] if got else None

    def _claim(self, name: str, number: int, entries: dict[str, Any], card: dict[str, Any]) -> dict[str, Any] | None:
        """Conditionally create the version's card; None if another publisher has it."""
        final = _build_card(name, number, entries, card)
        key = self._key(name, version_tag(number), CARD_FILE)
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, IfNoneMatch="*",
                                    Body=json.dumps(final, indent=2, sort_keys=True).encode() + b"\n",
                                    ContentType="application/json")
        except Exception as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return None
            raise self._error(exc, key) from exc
        return final

    def _publish_files(self, name, files, entries, card, progress):
        pointer = self._read_pointer(name)
        number = (int(pointer["version"]) if pointer else 0) + 1
        final = None
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            final = self._claim(name, number, entries, card)
            if final is not None:
                break
            # taken: jump past everything claimed so far instead of walking one by one
            number = max([number, *self._claimed_versions(name)]) + 1
        if final is None:
            raise StoreError(self._model_uri(name), "could not claim a free version number")
        total = len(files)
        _report(progress, 0, total)
        for done, (fname, path) in enumerate(files.items(), start=1):
            key = self._key(name, version_tag(number), fname)
            try:
                self._client.upload_file(str(path), self.bucket, key)
            except Exception as exc:
                raise self._error(exc, key) from exc
            _report(progress, done, total)
        return final

    def _advance_pointer(self, name, card):
        """Compare-and-swap on latest.json (If-Match its ETag) so it never moves back."""
        key = self._key(name, LATEST_FILE)
        body = json.dumps(_pointer(card, self._version_uri(name, card["version"])), indent=2).encode()
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            got = self._get_json(key)
            if got and int(got[0]["version"]) >= card["version"]:
                return
            condition = {"IfMatch": got[1]} if got else {"IfNoneMatch": "*"}
            try:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body,
                                        ContentType="application/json", **condition)
                return
            except Exception as exc:
                if self._code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise self._error(exc, key) from exc
        raise StoreError(self._uri(key), "could not update the latest pointer (too much contention)")

    def _fetch(self, name, version, fname, dest_path):
        key = self._key(name, version_tag(version), fname)
        try:
            self._client.download_file(self.bucket, key, str(dest_path))
        except Exception as exc:
            Path(dest_path).unlink(missing_ok=True)
            if self._code(exc) in ("404", "NoSuchKey"):
                raise StoreNotFoundError(self._uri(key), "file listed in the card is missing from "
                                         "the store (upload unfinished or deleted)") from exc
            raise self._error(exc, key) from exc


def open_store(url: str) -> ModelStore:
    """'s3://bucket/prefix' -> S3Store; a path or file:// URL -> LocalStore."""
    url = str(url).strip()
    if not url:
        raise StoreError("<empty>", "store URL is empty")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(url, "S3 URL needs a bucket: s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path, url=url.rstrip("/"))
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(url, "file:// URL must be local (file:///abs/path)")
        return LocalStore(Path(parsed.path), url=url)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise StoreError(url, f"unsupported store scheme {parsed.scheme!r} (use a path, file:// or s3://)")
    return LocalStore(Path(url), url=url)
