"""Model store against a local directory and a real S3 HTTP server (moto)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from hemaflow.store import (LocalStore, S3Store, StoreError, StoreIntegrityError,
                            StoreNotFoundError, open_store, parse_version, sha256_file)
from tests.fixtures.s3 import s3_server  # noqa: F401  (session fixture)

NAME = "wbc-classifier"


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.new_bucket()}/models"


def make_files(dir_path: Path, payload: bytes) -> dict[str, Path]:
    dir_path.mkdir(parents=True, exist_ok=True)
    files = {"model.keras": dir_path / "model.keras", "labels.json": dir_path / "labels.json",
             "metrics.json": dir_path / "metrics.json"}
    files["model.keras"].write_bytes(payload)
    files["labels.json"].write_text(json.dumps(["neutrophil", "lymphocyte"]))
    files["metrics.json"].write_text(json.dumps({"accuracy": 0.9}))
    return files


def put_raw(store, rel_key: str, data: bytes) -> None:
    """Write straight into the backend, behind the store's back."""
    if isinstance(store, LocalStore):
        path = store.root_dir / rel_key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        store._client.put_object(Bucket=store.bucket, Key=store._key(rel_key), Body=data)


def test_round_trip_publish_latest_list_pull(store_url, tmp_path):
    store = open_store(store_url)
    assert store.latest(NAME) is None
    assert store.list_versions(NAME) == []

    v1 = store.publish(NAME, make_files(tmp_path / "a", b"model-one"), {"note": "first"})
    v2 = store.publish(NAME, make_files(tmp_path / "b", b"model-two"), {"note": "second"})

    assert (v1.version, v2.version) == (1, 2)
    assert v2.uri.endswith(f"models/{NAME}/v0002") or v2.uri.endswith(f"registry/{NAME}/v0002")
    assert store.latest(NAME).version == 2
    assert [v.version for v in store.list_versions(NAME)] == [1, 2]

    out = store.pull(NAME, 1, tmp_path / "pulled1")
    assert (out / "model.keras").read_bytes() == b"model-one"
    assert json.loads((out / "labels.json").read_text()) == ["neutrophil", "lymphocyte"]
    card = json.loads((out / "card.json").read_text())
    assert card["note"] == "first" and card["version"] == 1
    assert card["sha256"] == sha256_file(tmp_path / "a" / "model.keras")

    for spec in ("latest", "v0002", "2"):
        out = store.pull(NAME, spec, tmp_path / f"pulled-{spec}")
        assert (out / "model.keras").read_bytes() == b"model-two"
    # a fresh store object sees the same state (nothing cached in memory)
    assert open_store(store_url).latest(NAME).sha256 == v2.sha256


def test_card_records_version_hashes_and_time(store_url, tmp_path):
    store = open_store(store_url)
    files = make_files(tmp_path, b"weights")
    mv = store.publish(NAME, files, {"metrics": {"accuracy": 0.9}, "source_commit": "abc123"})
    card = mv.card
    assert card["tag"] == "v0001" and card["name"] == NAME
    assert card["metrics"] == {"accuracy": 0.9} and card["source_commit"] == "abc123"
    assert set(card["files"]) == {"model.keras", "labels.json", "metrics.json"}
    assert card["files"]["labels.json"]["sha256"] == sha256_file(files["labels.json"])
    assert card["files"]["model.keras"]["bytes"] == len(b"weights")
    assert card["created_at"].endswith("Z") and card["created_at"][:2] == "20"


def test_versions_keep_counting_and_progress_is_reported(store_url, tmp_path):
    store = open_store(store_url)
    seen: list[tuple[int, int]] = []
    numbers = [store.publish(NAME, make_files(tmp_path / str(i), bytes([i])), {},
                             progress=lambda d, t: seen.append((d, t))).version
               for i in range(4)]
    assert numbers == [1, 2, 3, 4]
    assert seen[-1] == (3, 3) and (0, 3) in seen
    # another model in the same store numbers independently
    assert store.publish("other-model", make_files(tmp_path / "o", b"x"), {}).version == 1


def test_claimed_version_is_skipped(store_url, tmp_path):
    """A version another publisher already claimed (claim made, upload in flight) is
    never reused, and never listed until its card is written: on S3 the claim is a
    `.claim` object (If-None-Match 412 path), locally the directory."""
    store = open_store(store_url)
    store.publish(NAME, make_files(tmp_path / "a", b"one"), {})
    if isinstance(store, LocalStore):
        (store.root_dir / NAME / "v0002").mkdir()  # the local claim is the directory
    else:
        put_raw(store, f"{NAME}/v0002/.claim", b'{"owner": "other"}')
        put_raw(store, f"{NAME}/v0002/model.keras", b"half-uploaded")

    assert [v.version for v in store.list_versions(NAME)] == [1]  # in flight: not listed
    mv = store.publish(NAME, make_files(tmp_path / "b", b"two"), {})
    assert mv.version == 3
    assert store.latest(NAME).version == 3
    assert [v.version for v in store.list_versions(NAME)] == [1, 3]
    if isinstance(store, S3Store):
        obj = store._client.get_object(Bucket=store.bucket, Key=store._key(NAME, "v0002", ".claim"))
        assert json.loads(obj["Body"].read()) == {"owner": "other"}  # untouched


def test_concurrent_publishers_never_share_a_version(store_url, tmp_path):
    per_thread, threads = 4, 2
    barrier = threading.Barrier(threads)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def publisher(idx: int) -> None:
        store = open_store(store_url)  # own client/connection per publisher
        barrier.wait()
        try:
            results[idx] = [store.publish(NAME, make_files(tmp_path / f"t{idx}-{i}",
                                                           f"pub{idx}-{i}".encode()),
                                          {"publisher": idx, "i": i})
                            for i in range(per_thread)]
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=publisher, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not errors, errors
    got = [mv.version for mvs in results.values() for mv in mvs]
    assert sorted(got) == list(range(1, per_thread * threads + 1))

    store = open_store(store_url)
    for mvs in results.values():
        for mv in mvs:  # each stored version holds exactly what its publisher sent
            out = store.pull(NAME, mv.version, tmp_path / "check" / mv.tag)
            card = json.loads((out / "card.json").read_text())
            expected = f"pub{card['publisher']}-{card['i']}".encode()
            assert (out / "model.keras").read_bytes() == expected
            assert card["publisher"] == mv.card["publisher"]
    assert store.latest(NAME).version == per_thread * threads


def test_pull_detects_sha256_mismatch(store_url, tmp_path):
    store = open_store(store_url)
    store.publish(NAME, make_files(tmp_path / "a", b"genuine"), {})
    put_raw(store, f"{NAME}/v0001/model.keras", b"tampered")
    dest = tmp_path / "dest"
    with pytest.raises(StoreIntegrityError, match=rf"{NAME}/v0001/model.keras: sha256 mismatch"):
        store.pull(NAME, "latest", dest)
    assert not (dest / "model.keras").exists()


def test_missing_model_and_version_errors_name_the_url(store_url, tmp_path):
    store = open_store(store_url)
    with pytest.raises(StoreNotFoundError, match=rf"{NAME}: no such model '{NAME}' in {store_url}"):
        store.pull(NAME, "latest", tmp_path / "x")
    with pytest.raises(StoreNotFoundError, match="no such model"):
        store.pull(NAME, 3, tmp_path / "x")
    store.publish(NAME, make_files(tmp_path / "a", b"one"), {})
    with pytest.raises(StoreNotFoundError,
                       match=rf"{NAME}/v0009: no such version v0009 of model '{NAME}' \(published: v0001\)"):
        store.pull(NAME, "v9", tmp_path / "x")
    with pytest.raises(StoreError, match=rf"{NAME}: version must be 'production', 'latest'"):
        store.pull(NAME, "newest", tmp_path / "x")


def test_missing_file_in_store_is_reported(store_url, tmp_path):
    store = open_store(store_url)
    store.publish(NAME, make_files(tmp_path / "a", b"one"), {})
    if isinstance(store, LocalStore):
        (store.root_dir / NAME / "v0001" / "labels.json").unlink()
    else:
        store._client.delete_object(Bucket=store.bucket, Key=store._key(NAME, "v0001", "labels.json"))
    with pytest.raises(StoreNotFoundError, match=r"v0001/labels.json: file listed in the card is missing"):
        store.pull(NAME, 1, tmp_path / "dest")


def test_missing_bucket_is_named(s3_server, tmp_path):
    url = "s3://no-such-bucket-hemaflow/models"
    store = open_store(url)
    with pytest.raises(StoreNotFoundError, match=r"s3://no-such-bucket-hemaflow/models/.*no such bucket"):
        store.latest(NAME)
    with pytest.raises(StoreNotFoundError, match="no such bucket 'no-such-bucket-hemaflow'"):
        store.list_versions(NAME)
    with pytest.raises(StoreNotFoundError, match="no such bucket 'no-such-bucket-hemaflow'"):
        store.publish(NAME, make_files(tmp_path, b"m"), {})


def test_missing_credentials_are_explained(s3_server, monkeypatch, tmp_path):
    bucket = s3_server.new_bucket()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    store = open_store(f"s3://{bucket}")
    with pytest.raises(StoreError, match=rf"s3://{bucket}/{NAME}/latest.json: AWS credentials missing"):
        store.latest(NAME)


def test_publish_needs_model_file_and_clean_names(tmp_path):
    store = open_store(str(tmp_path / "reg"))
    files = make_files(tmp_path / "a", b"m")
    with pytest.raises(ValueError, match="model.keras"):
        store.publish(NAME, {"labels.json": files["labels.json"]}, {})
    with pytest.raises(ValueError, match="model name"):
        store.publish("../escape", files, {})
    with pytest.raises(StoreError, match=r"gone\.keras: file to publish as 'model.keras' not found"):
        store.publish(NAME, {"model.keras": tmp_path / "gone.keras"}, {})
    assert store.list_versions(NAME) == []  # nothing half-published


def test_open_store_picks_backend_by_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = open_store("models/registry")
    assert isinstance(rel, LocalStore) and rel.root_dir == tmp_path / "models" / "registry"
    assert open_store(f"file://{tmp_path}/reg").root_dir == tmp_path / "reg"
    s3 = open_store("s3://bucket-a/some/prefix/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket-a", "some/prefix")
    assert s3._model_uri(NAME) == f"s3://bucket-a/some/prefix/{NAME}"
    with pytest.raises(StoreError, match="gs://x: unsupported store scheme 'gs'"):
        open_store("gs://x")
    with pytest.raises(StoreError, match="needs a bucket"):
        open_store("s3:///prefix")


def test_parse_version_accepts_the_usual_spellings():
    assert [parse_version(s) for s in (3, "3", "v3", "v0003", "latest", "LATEST")] == [3, 3, 3, 3, None, None]
    for bad in (0, "v0", "-1", "new", 1.5):
        with pytest.raises(ValueError):
            parse_version(bad)
