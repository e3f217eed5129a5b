"""The registry on top of the store: production alias (compare-and-swap), ledger, rollback,
interrupted uploads, S3 faults injected at the HTTP level, verified pulls.

Every S3 test talks to a real moto server over HTTP; fault tests put a real proxy
(tests/fixtures/faulty_s3.py) between the store and moto.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from hemaflow.errors import StageInputError
from hemaflow.model_folder import open_model_folder
from hemaflow.store import (LocalStore, S3Store, StoreConflictError, StoreError, StoreIntegrityError,
                            StoreNotFoundError, open_store)
from tests.code.test_store import NAME, make_files, put_raw
from tests.fixtures.faulty_s3 import FaultyProxy
from tests.fixtures.s3 import s3_server  # noqa: F401  (session fixture)


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "registry")
    return f"s3://{request.getfixturevalue('s3_server').new_bucket('reg')}/models"


@pytest.fixture()
def proxy(s3_server, monkeypatch):
    """A faulty proxy in front of moto; S3 clients created in the test go through it."""
    p = FaultyProxy(s3_server.endpoint_url).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    yield p
    p.stop()


def publish_n(store, tmp_path: Path, n: int, start: int = 0) -> list:
    return [store.publish(NAME, make_files(tmp_path / f"m{i}", f"model-{i}".encode()), {"i": i})
            for i in range(start, start + n)]


def test_production_is_distinct_from_latest_and_moves_only_when_asked(store_url, tmp_path):
    store = open_store(store_url)
    publish_n(store, tmp_path, 2)
    assert store.production(NAME) is None and store.latest(NAME).version == 2
    with pytest.raises(StoreNotFoundError, match="no production version"):
        store.pull(NAME, "production", tmp_path / "p")

    store.set_production(NAME, 1, expected=None, reason="first")
    publish_n(store, tmp_path, 1, start=2)          # a newer version does not move production
    assert store.production(NAME).version == 1 and store.latest(NAME).version == 3
    assert (store.pull(NAME, "production", tmp_path / "p") / "model.keras").read_bytes() == b"model-0"

    store.set_production(NAME, 3, expected=1)
    with pytest.raises(StoreConflictError, match="production is v0003, not v0001"):
        store.set_production(NAME, 2, expected=1)   # stale read: refused, production unchanged
    assert store.production(NAME).version == 3
    with pytest.raises(StoreNotFoundError, match="no such version v0009"):
        store.set_production(NAME, 9, expected=3)


def test_rollback_walks_back_through_production_history(store_url, tmp_path):
    store = open_store(store_url)
    publish_n(store, tmp_path, 4)
    prev = None
    for v in (1, 2, 3):
        store.set_production(NAME, v, expected=prev)
        store.append_ledger(NAME, {"action": "promote", "version": v, "previous_production": prev,
                                   "production_changed": True})
        prev = v
    assert store.rollback(NAME).version == 2
    store.append_ledger(NAME, {"action": "rollback", "version": 2, "previous_production": 3,
                               "production_changed": True})
    assert store.production_pointer(NAME)["previous"] == 1     # not 3: the bad one stays rolled back
    store.set_production(NAME, 4, expected=2)
    store.append_ledger(NAME, {"action": "promote", "version": 4, "previous_production": 2,
                               "production_changed": True})
    assert store.rollback(NAME).version == 2
    assert store.rollback(NAME).version == 1
    with pytest.raises(StoreError, match="first production version: nothing to roll back to"):
        store.rollback(NAME)
    assert store.production(NAME).version == 1


def test_two_promotions_racing_exactly_one_becomes_production(store_url, tmp_path):
    store = open_store(store_url)
    publish_n(store, tmp_path, 1)
    store.set_production(NAME, 1, expected=None)
    for rnd in range(4):
        champion = store.production(NAME).version
        a, b = publish_n(store, tmp_path / f"r{rnd}", 2, start=10 * rnd + 10)
        barrier = threading.Barrier(2)
        outcome: dict[int, object] = {}

        def promote(version: int) -> None:
            own = open_store(store_url)  # own client / connection per promoter
            barrier.wait()
            try:
                outcome[version] = own.set_production(NAME, version, expected=champion)
            except StoreConflictError as exc:
                outcome[version] = exc

        threads = [threading.Thread(target=promote, args=(mv.version,)) for mv in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [v for v, o in outcome.items() if not isinstance(o, Exception)]
        losers = [o for o in outcome.values() if isinstance(o, StoreConflictError)]
        assert len(winners) == 1 and len(losers) == 1, outcome
        assert store.production(NAME).version == winners[0]
        assert losers[0].current is None or losers[0].current["version"] in (winners[0], champion)
        assert "another promotion" in str(losers[0])


def test_ledger_is_append_only_and_ordered(store_url, tmp_path):
    store = open_store(store_url)
    ids = [store.append_ledger(NAME, {"action": "promote", "version": v})["id"] for v in (1, 2, 3)]
    entries = store.ledger(NAME)
    assert [e["id"] for e in entries] == ids and [e["version"] for e in entries] == [1, 2, 3]
    assert all(e["at"].endswith("Z") and e["model_name"] == NAME for e in entries)
    with pytest.raises((StoreError, FileExistsError)):
        store._append(NAME, ids[0], {"overwrite": True})  # an entry is never rewritten
    assert store.ledger(NAME)[0]["version"] == 1


def test_crash_mid_upload_leaves_no_complete_version(store_url, tmp_path):
    store = open_store(store_url)
    publish_n(store, tmp_path, 1)
    store.set_production(NAME, 1, expected=None)

    def crash(done: int, total: int) -> None:
        if done == 1:
            raise KeyboardInterrupt("killed after the first file")

    with pytest.raises(KeyboardInterrupt):
        store.publish(NAME, make_files(tmp_path / "half", b"half"), {}, progress=crash)
    assert [v.version for v in store.list_versions(NAME)] == [1]
    assert store.latest(NAME).version == 1 and store.production(NAME).version == 1
    with pytest.raises(StoreNotFoundError):
        store.pull(NAME, 2, tmp_path / "x")
    nxt = store.publish(NAME, make_files(tmp_path / "next", b"next"), {})
    assert [v.version for v in store.list_versions(NAME)] == [1, nxt.version]


def test_connection_dropped_on_every_model_upload_never_lists(s3_server, proxy, tmp_path):
    bucket = s3_server.new_bucket("drop")
    store = S3Store(bucket, "models", max_attempts=3)
    publish_n(store, tmp_path, 1)
    store.set_production(NAME, 1, expected=None)
    proxy.fail("PUT", "/v0002/model.keras", times=None, action="reset")
    with pytest.raises(StoreError, match=r"v0002/model.keras: connection to the S3 endpoint kept failing "
                                         r"\(.*\) after 3 attempts with backoff"):
        store.publish(NAME, make_files(tmp_path / "b", b"never-arrives"), {})
    resets = [s for s in proxy.seen if s[2] == "reset"]
    assert 3 <= len(resets) <= 6  # retried with backoff (botocore, plus s3transfer's own try), then given up
    proxy.clear()
    assert [v.version for v in store.list_versions(NAME)] == [1]
    assert store.latest(NAME).version == 1 and store.production(NAME).version == 1
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"models/{NAME}/v0002/card.json" not in keys


def test_transient_errors_are_retried_with_backoff(s3_server, proxy, tmp_path):
    bucket = s3_server.new_bucket("flaky")
    store = S3Store(bucket, "models", max_attempts=4)
    proxy.fail("PUT", "/v0001/card.json", times=2, status=503)      # throttled
    proxy.fail("PUT", "/v0001/labels.json", times=1, status=500)    # server error
    proxy.fail("GET", "/production.json", times=1, action="reset")  # connection reset
    mv = store.publish(NAME, make_files(tmp_path / "a", b"flaky"), {})
    store.set_production(NAME, mv.version, expected=None)
    assert store.production(NAME).version == 1
    outcomes = [(m, p.split("?")[0].rsplit("/", 1)[-1], o) for m, p, o in proxy.seen]
    assert outcomes.count(("PUT", "card.json", "503")) == 2 and ("PUT", "card.json", "200") in outcomes
    assert ("PUT", "labels.json", "500") in outcomes and ("PUT", "labels.json", "200") in outcomes
    assert ("GET", "production.json", "reset") in outcomes
    assert (store.pull(NAME, "production", tmp_path / "p") / "model.keras").read_bytes() == b"flaky"


def test_permanent_errors_fail_at_once_with_a_clear_message(s3_server, proxy, tmp_path):
    bucket = s3_server.new_bucket("denied")
    store = S3Store(bucket, "models", max_attempts=5)
    proxy.fail("GET", "/production.json", times=None, status=403)
    with pytest.raises(StoreError, match=r"production.json: access denied \(AccessDenied\)"):
        store.production(NAME)
    assert [o for *_, o in proxy.seen] == ["403"]  # not retried
    proxy.fail("PUT", "/v0001/model.keras", times=None, status=403)
    proxy.seen.clear()
    with pytest.raises(StoreError, match=r"v0001/model.keras: access denied \(AccessDenied\)"):
        store.publish(NAME, make_files(tmp_path / "a", b"m"), {})
    assert [o for m, p, o in proxy.seen if p.endswith("model.keras")] == ["403"]
    proxy.fail("PUT", "/v0002/card.json", times=None, status=503)
    with pytest.raises(StoreError, match=r"card.json: S3 server error SlowDown, still failing after 5 attempts"):
        store.publish(NAME, make_files(tmp_path / "b", b"m2"), {})
    assert [(m, o) for m, p, o in proxy.seen if p.endswith("card.json")] == [("PUT", "503")] * 5, proxy.seen
    proxy.clear()
    proxy.seen.clear()
    missing = S3Store("no-such-bucket-hemaflow-x", "models", max_attempts=5)
    with pytest.raises(StoreNotFoundError, match="no such bucket 'no-such-bucket-hemaflow-x'"):
        missing.production(NAME)
    assert len(proxy.seen) == 1


def test_tampered_model_is_refused_at_pull_and_at_load(store_url, tmp_path):
    store = open_store(store_url)
    keras = pytest.importorskip("keras")
    d = tmp_path / "m"
    d.mkdir()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")]).save(d / "model.keras")
    (d / "labels.json").write_text(json.dumps(["a", "b"]))
    store.publish(NAME, {"model.keras": d / "model.keras", "labels.json": d / "labels.json"}, {})
    pulled = store.pull(NAME, "latest", tmp_path / "pulled")
    assert open_model_folder(pulled).load() is not None          # genuine: loads

    with open(pulled / "model.keras", "ab") as fh:               # tampered after the pull
        fh.write(b"x")
    with pytest.raises(StageInputError, match="sha256 mismatch.*refusing to load"):
        open_model_folder(pulled)

    genuine = (d / "model.keras").read_bytes()
    put_raw(store, f"{NAME}/v0001/model.keras", genuine[:-1] + bytes([genuine[-1] ^ 1]))  # tampered in the store
    with pytest.raises(StoreIntegrityError, match="sha256 mismatch"):
        store.pull(NAME, 1, tmp_path / "again")
    assert not (tmp_path / "again" / "model.keras").exists()


def test_pulled_card_naming_a_path_outside_is_refused(store_url, tmp_path):
    store = open_store(store_url)
    mv = publish_n(store, tmp_path, 1)[0]
    card = dict(mv.card, files={**mv.card["files"], "../x": {"sha256": "0" * 64, "bytes": 1}})
    put_raw(store, f"{NAME}/v0001/card.json", json.dumps(card).encode())
    put_raw(store, f"{NAME}/x", b"evil")
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(StoreIntegrityError, match="'../x' that is not a plain file name"):
        store.pull(NAME, 1, dest)
    assert not (tmp_path / "deep" / "x").exists() and not (dest / "model.keras").exists()


def test_credentials_never_reach_cards_ledger_or_messages(s3_server, monkeypatch, tmp_path):
    secret = "hemaflowSECRETkey0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAHEMAFLOWTESTKEY")
    bucket = s3_server.new_bucket("creds")
    store = open_store(f"s3://{bucket}/models")
    mv = publish_n(store, tmp_path, 1)[0]
    store.set_production(NAME, mv.version, expected=None)
    store.append_ledger(NAME, {"action": "promote", "version": 1})
    client = s3_server.client()
    for obj in client.list_objects_v2(Bucket=bucket)["Contents"]:
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode(errors="replace")
        assert secret not in body and "AKIAHEMAFLOWTESTKEY" not in body, obj["Key"]
    with pytest.raises(StoreError) as err:
        store.set_production(NAME, 1, expected=None)
    assert secret not in str(err.value) and "AKIAHEMAFLOWTESTKEY" not in str(err.value)


def test_local_registry_survives_make_clean(project_root, tmp_path):
    """`make clean` removes pipeline outputs, never models/registry (the default store)."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make not installed")
    for rel in ("models/registry/wbc-classifier/v0001/card.json", "models/candidate/model.keras",
                "reports/eval/metrics.json", "data/augmented/dataset.parquet", "data/raw/keep.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    subprocess.run(["make", "-s", "-f", str(project_root / "Makefile"), "-C", str(tmp_path), "clean"], check=True)
    assert (tmp_path / "models/registry/wbc-classifier/v0001/card.json").is_file()
    assert (tmp_path / "data/raw/keep.jpg").is_file()
    assert not (tmp_path / "models/candidate").exists() and not (tmp_path / "reports").exists()
    assert not (tmp_path / "data/augmented").exists()
    import yaml
    assert yaml.safe_load((project_root / "params.yaml").read_text())["promote"]["store_url"] == "models/registry"
