"""S3 servers that do not behave like AWS (issue 12, item 3), reproduced by a proxy in front of moto:
one that ignores ``If-None-Match``, one that answers 412 without ``<Condition>``, one that answers
501; and pointer moves by compare-and-swap with ``If-Match`` (item 7)."""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pytest

from infra.errors import PointerMoved, UnsupportedServer, is_transient_store_error
from infra.store import Store

sys.path.insert(0, os.path.dirname(__file__))
from s3_proxy import S3Proxy  # noqa: E402
from test_store_errors import client_error  # noqa: E402


@pytest.fixture
def proxy(s3_server):
    """``proxy(**behaviour)``: a fresh misbehaving proxy (its own endpoint, so nothing is cached)."""
    made: list[S3Proxy] = []

    def make(**behaviour) -> S3Proxy:
        made.append(S3Proxy(s3_server.endpoint_url, s3_server.client(), **behaviour))
        return made[-1]

    yield make
    for each in made:
        each.close()


def write(store: Store, value: int, key: str = "k"):
    with store.begin("s", key, config={}) as writer:
        writer.write_table("rows", pa.table({"v": [value]}))
        return writer.commit({"writer": value})


def test_a_server_that_ignores_if_none_match_is_refused_when_the_store_opens(s3_uri, proxy):
    server = proxy(ignore_if_none_match=True)
    with pytest.raises(
        UnsupportedServer, match=r"ignores If-None-Match: a second exclusive create .* succeeded"
    ) as caught:
        Store.open(s3_uri, endpoint_url=server.endpoint_url)
    assert server.endpoint_url in str(caught.value)
    # A store that skipped the check (as Ray workers unpickle it) proves it before its first commit.
    unchecked = Store.open(s3_uri, endpoint_url=server.endpoint_url, check=False)
    with pytest.raises(UnsupportedServer, match="ignores If-None-Match"):
        write(unchecked, 1)
    assert unchecked.list_manifests() == []
    assert unchecked.backend.list_files(unchecked.backend.join(".fewstep-probe")) == {}  # the probe cleans up


def test_the_proof_is_made_once_per_endpoint_and_bucket(s3_uri, proxy):
    server = proxy()
    for _ in range(3):
        store = Store.open(s3_uri, endpoint_url=server.endpoint_url)
    write(store, 1)
    # Two conditional PUTs for the proof, one for the manifest: the later opens reused the proof.
    assert server.requests[("PUT", True)] == 3


def test_a_412_without_a_condition_is_a_lost_race_and_the_loser_adopts_the_winner(s3_uri, proxy):
    server = proxy(bare_412=True)
    store = Store.open(s3_uri, endpoint_url=server.endpoint_url)  # the proof itself meets a bare 412
    first = store.begin("s", "k", config={})
    second = store.begin("s", "k", config={})
    first.write_table("rows", pa.table({"v": [1]}))
    second.write_table("rows", pa.table({"v": [2]}))
    winner = first.commit({"writer": 1})
    assert second.commit({"writer": 2}) == winner  # today: OSError(EINVAL) from s3fs
    assert store.read_table(winner, "rows").column("v").to_pylist() == [1]
    assert store.backend.create_exclusive(store.backend.join("x"), b"1") is True
    assert store.backend.create_exclusive(store.backend.join("x"), b"2") is False
    assert server.requests[("PUT", True)] >= 4


def test_501_is_permanent_and_says_the_server_does_not_implement_it(s3_uri, proxy):
    assert not is_transient_store_error(client_error("NotImplemented", 501))
    server = proxy(not_implemented=True)
    with pytest.raises(
        UnsupportedServer, match=r"does not implement conditional writes .*501 Not Implemented"
    ) as caught:
        Store.open(s3_uri, endpoint_url=server.endpoint_url)
    assert "check that the S3 endpoint is up" not in str(caught.value)
    assert server.requests[("PUT", True)] == 1  # no retries: today 5 tries, then "check the endpoint is up"


def test_a_pointer_move_is_a_compare_and_swap_with_if_match(s3_uri, s3_server, monkeypatch):
    store = Store.open(s3_uri)
    a, b, c = (write(store, i, key=f"k{i}").ref for i in range(3))
    store.put_pointer("serving/current", a, expect=None)
    with pytest.raises(PointerMoved, match=f"points at {a}, not at nothing"):
        store.put_pointer("serving/current", b, expect=None)
    store.put_pointer("serving/current", b, expect=a)
    with pytest.raises(PointerMoved, match=f"points at {b}, not at {a} .* not moved to {c}"):
        store.put_pointer("serving/current", c, expect=a)

    # Another process moves it between our read and our write: the ETag no longer matches.
    key = f"{s3_uri.split('/', 3)[3]}/pointers/serving/current.json"
    bucket = s3_uri.split("/")[2]
    call_s3 = store.fs.call_s3

    def moved_meanwhile(method, *args, **kwargs):
        if method == "put_object" and "IfMatch" in kwargs:
            s3_server.client().put_object(Bucket=bucket, Key=key, Body=b'{"ref": "%s"}' % a.encode())
        return call_s3(method, *args, **kwargs)

    monkeypatch.setattr(store.fs, "call_s3", moved_meanwhile)
    with pytest.raises(PointerMoved, match=f"points at {a}, not at {b}"):
        store.put_pointer("serving/current", c, expect=b)
    monkeypatch.undo()
    assert store.get_pointer("serving/current") == a
