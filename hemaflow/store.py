"""Versioned model store: a local directory or an S3 bucket, one interface.

Layout under the root (directory or s3://bucket/prefix):

    <model_name>/v0001/model.keras, labels.json, metrics.json, ..., card.json
    <model_name>/latest.json      -> newest *complete* version
    <model_name>/production.json  -> the version consumers use (moved only by a promotion
                                     or a rollback, compare-and-swap)
    <model_name>/ledger/...       -> append-only record of every decision

A version number is claimed atomically (mkdir locally, a conditional put of a
`v0001/.claim` object with If-None-Match: * on S3), so concurrent publishers never share
one. The files are uploaded next and card.json is written *last*: a version is complete
exactly when its card exists, so an interrupted upload never lists as a version, never
becomes latest and never production. The latest pointer only moves forward; the
production pointer moves by compare-and-swap (S3: If-Match on its ETag, If-None-Match for
the first; locally an atomic rename under a lock), so of two concurrent promotions from
the same champion exactly one wins and the other gets StoreConflictError.

S3 errors: transient ones (throttling, 5xx, connection resets) are retried by botocore's
"standard" retry mode with exponential backoff; permanent ones (access denied, no such
bucket) fail at once with a message naming the key. Credentials come from the standard
AWS chain (environment, profile, instance role) and are never written anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from hemaflow.progress import Progress

from hemaflow.model_folder import CARD_FILE, MODEL_FILE, sha256_file  # noqa: E402,F401  (re-exported)
LATEST_FILE = "latest.json"
PRODUCTION_FILE = "production.json"
LEDGER_DIR = "ledger"
CLAIM_FILE = ".claim"
S3_MAX_ATTEMPTS = int(os.environ.get("HEMAFLOW_S3_MAX_ATTEMPTS", "6"))  # 1 try + 5 retries
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


class StoreConflictError(StoreError):
    """A conditional write lost: the production alias moved since it was read."""

    def __init__(self, where: str, problem: str, current: dict[str, Any] | None = None):
        self.current = current
        super().__init__(where, problem)


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
    """'latest' -> None; 3, '3', 'v3', 'v0003' -> 3; anything else -> ValueError.
    ('production' is resolved by the store, see ModelStore.resolve.)"""
    if isinstance(spec, int) and not isinstance(spec, bool):
        number = spec
    elif isinstance(spec, str) and spec.strip().lower() == "latest":
        return None
    elif isinstance(spec, str) and re.fullmatch(r"v?\d+", spec.strip()):
        number = int(spec.strip().lstrip("v"))
    else:
        raise ValueError(f"version must be 'production', 'latest', an int or 'vNNNN', got {spec!r}")
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
        if not _NAME_RE.match(fname) or fname in (CARD_FILE, LATEST_FILE, PRODUCTION_FILE, CLAIM_FILE):
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


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _production_pointer(card: dict[str, Any], uri: str, previous: int | None, reason: str) -> dict[str, Any]:
    return {**_pointer(card, uri), "previous": previous, "reason": reason}


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
        """Version numbers taken, ascending (local: complete ones; S3: every claimed prefix,
        complete or not, so a number is never reused)."""

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

    @abstractmethod
    def _read_production(self, name: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def _swap_production(self, name: str, pointer: dict[str, Any], expected: int | None) -> None:
        """Write production.json if it still names `expected` (None: absent); else StoreConflictError."""

    @abstractmethod
    def _append(self, name: str, entry_id: str, entry: dict[str, Any]) -> None: ...

    @abstractmethod
    def _read_ledger(self, name: str) -> list[dict[str, Any]]: ...

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

    def production(self, model_name: str) -> ModelVersion | None:
        """The version the production alias names, or None before the first promotion."""
        _check_name(model_name)
        pointer = self._read_production(model_name)
        if pointer is None:
            return None
        card = self._read_card(model_name, int(pointer["version"]))
        if card is None:
            raise StoreNotFoundError(self._version_uri(model_name, int(pointer["version"])),
                                     f"{PRODUCTION_FILE} points at a version whose {CARD_FILE} is missing")
        return self._as_version(model_name, card)

    def production_pointer(self, model_name: str) -> dict[str, Any] | None:
        _check_name(model_name)
        return self._read_production(model_name)

    def set_production(self, model_name: str, version: int, expected: int | None,
                       reason: str = "") -> ModelVersion:
        """Move the production alias to `version` if it still names `expected` (None: no
        production yet). Raises StoreConflictError, naming the current one, if it moved."""
        _check_name(model_name)
        card = self._read_card(model_name, int(version))
        if card is None:
            raise self._missing(model_name, version_tag(int(version)))
        pointer = _production_pointer(card, self._version_uri(model_name, int(version)), expected, reason)
        self._swap_production(model_name, pointer, expected)
        return self._as_version(model_name, card)

    def rollback_target(self, model_name: str) -> tuple[ModelVersion, int | None]:
        """(current production, the version a rollback returns to); StoreError if there is none."""
        current = self._read_production(model_name)
        if current is None:
            raise StoreNotFoundError(self._model_uri(model_name), "no production version: nothing to roll back")
        previous = current.get("previous")
        if previous is None:
            raise StoreError(self._model_uri(model_name),
                             f"production {current['tag']} was the first production version: nothing to roll back to")
        return self.production(model_name), int(previous)

    def rollback(self, model_name: str, reason: str = "rollback") -> ModelVersion:
        """Production back to the version it replaced (compare-and-swap, like a promotion).

        The restored pointer's own `previous` is what that version had replaced when it was
        last made production (from the ledger), so repeated rollbacks walk back in history."""
        current, target = self.rollback_target(model_name)
        before = None
        for entry in reversed(self.ledger(model_name)):
            if entry.get("production_changed") and entry.get("version") == target \
                    and entry.get("action") != "rollback":
                before = entry.get("previous_production")
                break
        card = self._read_card(model_name, target)
        if card is None:
            raise self._missing(model_name, version_tag(target))
        pointer = _production_pointer(card, self._version_uri(model_name, target), before, reason)
        self._swap_production(model_name, pointer, current.version)
        return self._as_version(model_name, card)

    def append_ledger(self, model_name: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Add one decision record (never rewritten); returns it with its id and time."""
        _check_name(model_name)
        at = _now()
        entry_id = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}"
        record = {"id": entry_id, "at": at, "model_name": model_name, **entry}
        self._append(model_name, entry_id, record)
        return record

    def ledger(self, model_name: str) -> list[dict[str, Any]]:
        """Every decision recorded for model_name, oldest first."""
        _check_name(model_name)
        return sorted(self._read_ledger(model_name), key=lambda e: e.get("id", ""))

    def find_sha256(self, model_name: str, sha256: str) -> ModelVersion | None:
        """The newest complete version whose model.keras has this sha256."""
        for mv in reversed(self.list_versions(model_name)):
            if mv.sha256 == sha256:
                return mv
        return None

    def resolve(self, model_name: str, spec: str | int) -> ModelVersion:
        """'production', 'latest', or a version number/tag -> that complete version."""
        _check_name(model_name)
        return self._resolve(model_name, spec)

    def list_versions(self, model_name: str) -> list[ModelVersion]:
        """Every *complete* version (card written), oldest first."""
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
        for fname in files:  # a card naming ../x (or any non-plain name) writes nothing
            if not _NAME_RE.match(str(fname)) or fname in (CARD_FILE, LATEST_FILE, PRODUCTION_FILE):
                raise StoreIntegrityError(f"{mv.uri}/{CARD_FILE}",
                                          f"lists a file name {fname!r} that is not a plain file name; "
                                          "refusing to write outside the destination")
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
        if isinstance(spec, str) and spec.strip().lower() == "production":
            mv = self.production(name)
            if mv is None:
                claimed = self._claimed_versions(name)
                raise StoreNotFoundError(self._model_uri(name), f"no production version of {name!r} in {self.url}"
                                         + (" (nothing published)" if not claimed else
                                            f" (versions: {', '.join(version_tag(v) for v in claimed)}; "
                                            "promote one with `hemaflow models promote`)"))
            return mv
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
    def _locked(self, name: str, lock_name: str = ".latest.lock") -> Iterator[None]:
        with open(self.root_dir / name / lock_name, "a") as fh:
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

    def _read_production(self, name):
        return self._read_json(self.root_dir / name / PRODUCTION_FILE)

    def _swap_production(self, name, pointer, expected):
        model_dir = self.root_dir / name
        model_dir.mkdir(parents=True, exist_ok=True)
        with self._locked(name, ".production.lock"):
            current = self._read_production(name)
            current_version = int(current["version"]) if current else None
            if current_version != expected:
                raise StoreConflictError(
                    str(model_dir / PRODUCTION_FILE),
                    f"production is {current['tag'] if current else 'unset'}, not "
                    f"{version_tag(expected) if expected else 'unset'} as read: another promotion or rollback "
                    "moved it meanwhile", current)
            fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".production.")
            with os.fdopen(fd, "w") as fh:
                json.dump(pointer, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, model_dir / PRODUCTION_FILE)  # atomic: readers see the old or the new pointer

    def _append(self, name, entry_id, entry):
        ledger_dir = self.root_dir / name / LEDGER_DIR
        ledger_dir.mkdir(parents=True, exist_ok=True)
        with open(ledger_dir / f"{entry_id}.json", "x") as fh:  # never overwrites
            fh.write(json.dumps(entry, indent=2, sort_keys=True) + "\n")

    def _read_ledger(self, name):
        ledger_dir = self.root_dir / name / LEDGER_DIR
        if not ledger_dir.is_dir():
            return []
        return [e for f in sorted(ledger_dir.glob("*.json")) if (e := self._read_json(f)) is not None]

    def _fetch(self, name, version, fname, dest_path):
        src = self.root_dir / name / version_tag(version) / fname
        if not src.is_file():
            raise StoreNotFoundError(str(src), "file listed in the card is missing from the store")
        shutil.copyfile(src, dest_path)


# ---------------------------------------------------------------------------
class S3Store(ModelStore):
    """s3://bucket/prefix through boto3; honours AWS_ENDPOINT_URL(_S3) for MinIO/moto."""

    def __init__(self, bucket: str, prefix: str = "", url: str | None = None, max_attempts: int | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = url or f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        session = boto3.session.Session()  # the standard credential chain; nothing stored here
        # standard mode retries throttling, 5xx and connection errors with exponential backoff
        # and jitter; 4xx such as AccessDenied / NoSuchBucket are not retried (they fail at once)
        self._max_attempts = max_attempts or S3_MAX_ATTEMPTS
        self._client = session.client(
            "s3", region_name=session.region_name or "us-east-1",
            config=Config(connect_timeout=10, read_timeout=60,
                          retries={"mode": "standard", "total_max_attempts": self._max_attempts}))

    # keys and uris
    def _key(self, *parts: str) -> str:
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _model_uri(self, name: str) -> str:
        return self._uri(self._key(name))

    # error translation: every failure names the key and says what to do
    def _error(self, exc: Exception, key: str | None) -> StoreError:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (ClientError, ConnectionError, EndpointConnectionError, HTTPClientError,
                                         NoCredentialsError, PartialCredentialsError)

        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
            exc = exc.__context__  # s3transfer wraps the ClientError / connection error
        where = self._uri(key) if key else self.url
        attempts = self._max_attempts
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(where, "AWS credentials missing: set AWS_ACCESS_KEY_ID and "
                                     "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(exc, EndpointConnectionError):
            return StoreError(where, f"cannot reach the S3 endpoint: {exc}")
        if isinstance(exc, (ConnectionError, HTTPClientError)):  # resets, closed, timeouts: retried already
            return StoreError(where, f"connection to the S3 endpoint kept failing ({type(exc).__name__}) after "
                                     f"{attempts} attempts with backoff; try again later")
        if isinstance(exc, ClientError) and str(exc.response.get("ResponseMetadata", {}).get(
                "HTTPStatusCode", "")).startswith("5"):
            code = str(exc.response.get("Error", {}).get("Code", "")) or "5xx"
            return StoreError(where, f"S3 server error {code}, still failing after {attempts} attempts with "
                                     "backoff; try again later")
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

    def _put_new(self, key: str, body: bytes) -> bool:
        """Create key only if absent (If-None-Match: *); False if it already exists."""
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, IfNoneMatch="*", Body=body,
                                    ContentType="application/json")
        except Exception as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise self._error(exc, key) from exc
        return True

    def _claim(self, name: str, number: int) -> bool:
        """Conditionally create the version's claim object; False if another publisher has it."""
        body = json.dumps({"claimed_at": _now(), "host": socket.gethostname(), "pid": os.getpid()}).encode()
        return self._put_new(self._key(name, version_tag(number), CLAIM_FILE), body)

    def _publish_files(self, name, files, entries, card, progress):
        number = max(self._claimed_versions(name), default=0) + 1
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            if self._claim(name, number):
                break
            # taken: jump past everything claimed so far instead of walking one by one
            number = max([number, *self._claimed_versions(name)]) + 1
        else:
            raise StoreError(self._model_uri(name), "could not claim a free version number")
        final = _build_card(name, number, entries, card)
        total = len(files)
        uploaded: list[str] = []
        try:
            _report(progress, 0, total)
            for done, (fname, path) in enumerate(files.items(), start=1):
                key = self._key(name, version_tag(number), fname)
                try:
                    self._client.upload_file(str(path), self.bucket, key)
                except Exception as exc:
                    raise self._error(exc, key) from exc
                uploaded.append(key)
                _report(progress, done, total)
            # card last: its existence is what makes the version complete (listed, pullable)
            card_key = self._key(name, version_tag(number), CARD_FILE)
            if not self._put_new(card_key, json.dumps(final, indent=2, sort_keys=True).encode() + b"\n"):
                raise StoreError(self._uri(card_key), "card already exists for a version this publisher claimed")
        except BaseException:
            for key in uploaded:  # best effort; the claim stays, so the number is never reused
                with contextlib.suppress(Exception):
                    self._client.delete_object(Bucket=self.bucket, Key=key)
            raise
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

    def _read_production(self, name):
        got = self._get_json(self._key(name, PRODUCTION_FILE))
        return got[0] if got else None

    def _swap_production(self, name, pointer, expected):
        """If-Match the ETag read (If-None-Match: * for the first): of two racing writers one wins."""
        key = self._key(name, PRODUCTION_FILE)
        got = self._get_json(key)
        current = got[0] if got else None
        current_version = int(current["version"]) if current else None
        conflict = StoreConflictError(
            self._uri(key), f"production is {current['tag'] if current else 'unset'}, not "
                            f"{version_tag(expected) if expected else 'unset'} as read: another promotion or "
                            "rollback moved it meanwhile", current)
        if current_version != expected:
            raise conflict
        condition = {"IfMatch": got[1]} if got else {"IfNoneMatch": "*"}
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, ContentType="application/json",
                                    Body=json.dumps(pointer, indent=2).encode(), **condition)
        except Exception as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                now = self._get_json(key)
                raise StoreConflictError(
                    self._uri(key), f"production moved to {now[0]['tag'] if now else 'unset'} by another "
                                    "promotion or rollback while this one was writing", now[0] if now else None
                ) from None
            raise self._error(exc, key) from exc

    def _append(self, name, entry_id, entry):
        key = self._key(name, LEDGER_DIR, f"{entry_id}.json")
        if not self._put_new(key, json.dumps(entry, indent=2, sort_keys=True).encode() + b"\n"):
            raise StoreError(self._uri(key), "ledger entry already exists (never overwritten)")

    def _read_ledger(self, name):
        prefix = self._key(name, LEDGER_DIR) + "/"
        keys = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".json")]
        except Exception as exc:
            raise self._error(exc, prefix) from exc
        return [got[0] for k in sorted(keys) if (got := self._get_json(k)) is not None]

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
