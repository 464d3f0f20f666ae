"""Hostile input to the public API and the viewer's server: saved maps that are damaged or foreign, and requests
that name another origin or an index no run has. Each is refused with one clear error, never a traceback."""

from __future__ import annotations

import json
import math
import re
import socket
import zipfile
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ask, serving

from xclip import InteractionMap, StoreError
from xclip.core.geometry import Preprocessing
from xclip.core.tokens import CaptionTokens


def full_map() -> InteractionMap:
    """A caption-image map with every field away from its default: 5 caption tokens x (CLS + 2 x 3 patches)."""
    tokens = CaptionTokens("a red dog", ["<s>", "a", "red", "dog", "</s>"], [(0, 0), (0, 1), (2, 5), (6, 9), (0, 0)],
                           [True, False, False, False, True], [False, False, False, True, False])
    geometry = Preprocessing((96, 64), (16.0, 0.0, 80.0, 64.0), (64, 64), (2, 3))
    return InteractionMap(
        score=0.25, terms=torch.tensor([0.25, 0.5, -0.125, 0.0625], dtype=torch.float64), four_term_value=-0.3125,
        completeness_error=1e-9, completeness_bound=2e-9, score_scale=3.5, map_error_bound=1e-4,
        interactions=torch.from_numpy(np.random.default_rng(0).normal(size=(5, 7))), row_labels=tokens.tokens,
        column_labels=["cls", *(f"patch({r},{c})" for r in range(2) for c in range(3))], grid=(2, 3), n_prefix=1,
        logit_scale=100.0, caption_tokens=tokens, geometry=geometry, caption_index=3, image_index=7,
        image="scenes/dog.png", is_caption_truncated=True,
    )


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


# --- InteractionMap.save and load ------------------------------------------------------------------------------------
def test_every_field_of_a_map_survives_save_and_load(tmp_path):
    pair = full_map()
    for field in fields(InteractionMap):  # every field set: a field that save drops cannot pass as its default
        assert field.default is MISSING or getattr(pair, field.name) != field.default, field.name
    loaded = InteractionMap.load(pair.save(tmp_path / "pair.npz"))
    for field in fields(InteractionMap):
        assert same(getattr(loaded, field.name), getattr(pair, field.name)), field.name
    assert loaded.caption == "a red dog" and torch.equal(loaded.span("red"), pair.span("red"))


def test_save_writes_exactly_the_path_given_and_replaces_it_whole(tmp_path, monkeypatch):
    pair = full_map()
    assert pair.save(tmp_path / "pair") == tmp_path / "pair"  # no .npz added
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]
    assert same(InteractionMap.load(str(tmp_path / "pair")).interactions, pair.interactions)
    earlier = (tmp_path / "pair").read_bytes()

    def fail(stream, **arrays):
        stream.write(b"PK half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(StoreError, match="pair"):
        pair.save(tmp_path / "pair")
    assert (tmp_path / "pair").read_bytes() == earlier  # the earlier map whole, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]


def test_a_map_saved_before_its_identity_fields_loads_with_their_defaults(tmp_path):
    pair = full_map()
    meta = {  # what save wrote before maps carried their identity and a map error bound
        "numbers": {name: getattr(pair, name) for name in ("score", "four_term_value", "completeness_error", "completeness_bound", "score_scale")},
        "row_labels": pair.row_labels, "column_labels": pair.column_labels, "grid": [2, 3], "n_prefix": 1, "logit_scale": 100.0,
        "caption_tokens": vars(pair.caption_tokens), "geometry": pair.geometry.to_row().tolist(),
    }
    path = tmp_path / "old.npz"
    np.savez(path, interactions=pair.interactions.numpy(), terms=pair.terms.numpy(), meta=np.array(json.dumps(meta)))
    loaded = InteractionMap.load(path)
    assert (loaded.caption_index, loaded.image_index, loaded.image, loaded.is_caption_truncated) == (None, None, None, False)
    assert math.isnan(loaded.map_error_bound) and loaded.score == pair.score and loaded.caption_tokens == pair.caption_tokens


def rewrite(source: Path, target: Path, **changes: object) -> None:
    """``source``'s arrays with ``changes`` (arrays, or a dict of meta entries; None removes one) to ``target``."""
    with np.load(source) as stored:
        arrays = {name: stored[name] for name in stored.files}
    meta = json.loads(str(arrays["meta"]))
    for key, value in changes.pop("meta", {}).items():  # type: ignore[attr-defined]
        meta.pop(key) if value is None else meta.__setitem__(key, value)
    arrays["meta"] = np.array(json.dumps(meta))
    arrays.update(changes)
    for name in [name for name, value in arrays.items() if value is None]:
        del arrays[name]
    with target.open("wb") as stream:
        np.savez(stream, **arrays, allow_pickle=True)


def write_meta_text(source: Path, target: Path, text: str) -> None:
    with np.load(source) as stored:
        arrays = {name: stored[name] for name in stored.files}
    with target.open("wb") as stream:
        np.savez(stream, **{**arrays, "meta": np.array(text)})


def write_npy(target: Path) -> None:
    with target.open("wb") as stream:
        np.save(stream, np.zeros(3))


def flip_a_byte_in_the_interactions(source: Path, target: Path) -> None:
    data = bytearray(source.read_bytes())
    data[data.index(b"interactions.npy") + 200] ^= 0xFF  # inside the array's stored bytes: its CRC no longer matches
    target.write_bytes(bytes(data))


DAMAGED = {
    "truncated": (lambda s, t: t.write_bytes(s.read_bytes()[: s.stat().st_size // 2]), "BadZipFile"),
    "empty": (lambda s, t: t.write_bytes(b""), "an empty file"),
    "a byte flipped": (flip_a_byte_in_the_interactions, "CRC"),
    "a zip, not an npz": (lambda s, t: zipfile.ZipFile(t, "w").writestr("notes.txt", "hello"), "has notes.txt but not interactions, terms, meta"),
    "a single .npy array": (lambda s, t: write_npy(t), "a single .npy array"),
    "not a numpy file": (lambda s, t: t.write_text("hello"), "not an .npz archive (it starts with b'hello')"),
    "no terms": (lambda s, t: rewrite(s, t, terms=None), "has interactions, meta but not terms"),
    "no row labels": (lambda s, t: rewrite(s, t, meta={"row_labels": None}), "metadata lacks row_labels"),
    "an extra row": (lambda s, t: rewrite(s, t, interactions=np.zeros((6, 7))), "5 row labels for 6 rows"),
    "a missing column": (lambda s, t: rewrite(s, t, interactions=np.zeros((5, 6)), meta={"column_labels": ["x"] * 6}),
                         "1 prefix columns and a patch grid of [2, 3] for 6 columns"),
    "tokens for other rows": (lambda s, t: rewrite(s, t, meta={"row_labels": ["a"] * 4}, interactions=np.zeros((4, 7))), "5 caption tokens for 4 rows"),
    "a grid unlike its geometry": (lambda s, t: rewrite(s, t, meta={"grid": [3, 2]}), "patch geometry of a [2.0, 3.0] grid for a map of [3, 2]"),
    "1-D interactions": (lambda s, t: rewrite(s, t, interactions=np.zeros(35)), "interactions is a 1-D float64 array, not a 2-D float one"),
    "integer interactions": (lambda s, t: rewrite(s, t, interactions=np.zeros((5, 7), dtype=np.int64)), "interactions is a 2-D int64 array"),
    "five terms": (lambda s, t: rewrite(s, t, terms=np.zeros(5)), "terms has shape (5,), not (4,)"),
    "an object array": (lambda s, t: rewrite(s, t, interactions=np.array([[object()] * 7] * 5)), "Object arrays cannot be loaded when allow_pickle=False"),
    "meta not JSON": (lambda s, t: write_meta_text(s, t, "{not json"), "meta is not JSON"),
    "meta nested past the decoder": (lambda s, t: write_meta_text(s, t, "[" * 100_000), "meta is not JSON (RecursionError"),
    "meta a list": (lambda s, t: write_meta_text(s, t, "[]"), "meta is JSON list, not an object"),
    "a text for n_prefix": (lambda s, t: rewrite(s, t, meta={"n_prefix": "1"}), 'n_prefix is not an integer from 0 to 7: "1"'),
    "a text for a number": (lambda s, t: rewrite(s, t, meta={"numbers": {"score": "high"}}), "score is not a number"),
    "a negative image index": (lambda s, t: rewrite(s, t, meta={"image_index": -1}), "image_index is not null or an index: -1"),
    "tokens without flags": (lambda s, t: rewrite(s, t, meta={"caption_tokens": {"caption": "a", "tokens": ["a"]}}), "caption_tokens is not"),
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_damaged_or_foreign_map_file_is_one_error_naming_the_file_and_fault(tmp_path, damage):
    saved = full_map().save(tmp_path / "good.npz")
    target = tmp_path / "bad.npz"
    make, fault = DAMAGED[damage]
    make(saved, target)
    with pytest.raises(StoreError, match=f"{re.escape(f'cannot read the interaction map {target}: ')}.*{re.escape(fault)}") as raised:
        InteractionMap.load(target)
    assert "InteractionMap.save" in str(raised.value)


def test_a_missing_map_file_is_named(tmp_path):
    with pytest.raises(StoreError, match=f"no interaction map at {re.escape(str(tmp_path / 'none.npz'))}: no such file"):
        InteractionMap.load(tmp_path / "none.npz")
    with pytest.raises(StoreError, match="a folder"):
        InteractionMap.load(tmp_path)


def test_big_endian_arrays_load_as_native_tensors(tmp_path):
    saved = full_map().save(tmp_path / "pair.npz")
    with np.load(saved) as stored:
        interactions, terms = stored["interactions"], stored["terms"]
    rewrite(saved, tmp_path / "swapped.npz", interactions=interactions.astype(">f8"), terms=terms.astype(">f8"))
    loaded = InteractionMap.load(tmp_path / "swapped.npz")
    assert torch.equal(loaded.interactions, torch.from_numpy(interactions)) and torch.equal(loaded.terms, torch.from_numpy(terms))


# --- the viewer's server ---------------------------------------------------------------------------------------------
def raw_request(port: int, request: str) -> tuple[int, bytes]:
    """Send ``request`` as it is (http.client cannot send an absolute-form target); the status and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(request.encode("latin-1"))
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_an_index_no_run_has_is_not_found_without_a_traceback(finished_run, capfd):
    long = "9" * 5000  # past int()'s 4,300 digits
    indices = (long, "1" + "0" * 18, "0" * 5000, "007", "-" + long, "1e3")  # finished_run has 2 pairs
    with serving(finished_run) as server:
        port = server.server_address[1]
        for index in indices:
            for route in (f"/api/pair/{index}", f"/api/pair/{index}/image.png", f"/api/pair/{index}/contours.png",
                          f"/api/image/{index}/thumb.png?v=0"):
                status, body = ask(port, route)
                assert status == 404 and "not" in json.loads(body)["error"], (index[:20], route)
                assert len(body) < 300  # the answer names the address, cut short
        assert ask(port, "/api/pair/0")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_a_request_line_naming_another_origin_is_refused(finished_run):
    with serving(finished_run) as server:
        port = server.server_address[1]
        own = f"127.0.0.1:{port}"
        for target in ("http://evil.example/", "http://evil.example/api/run", f"http://evil.example:{port}/api/pair/0",
                       f"http://{own}.evil.example/api/run", f"http://user@{own}/api/run", f"https://{own}/api/run",
                       f"HTTP://127.0.0.1:{port + 1}/api/run"):
            status, body = raw_request(port, f"GET {target} HTTP/1.1\r\nHost: {own}\r\nConnection: close\r\n\r\n")
            assert status == 421 and list(json.loads(body)) == ["error"], target  # no data of the run
            assert "this server answers only" in json.loads(body)["error"], target
        for request in (f"GET /api/run HTTP/1.1\r\nHost: {own}\r\nHost: evil.example\r\n",  # two Hosts
                        "GET /api/run HTTP/1.0\r\n",  # none
                        f"GET http://{own}/api/run HTTP/1.1\r\nHost: evil.example\r\n"):  # the target's own, the Host not
            status, body = raw_request(port, request + "Connection: close\r\n\r\n")
            assert status == 421 and list(json.loads(body)) == ["error"], request
        for target in ("*", own):  # asterisk and authority forms name no page
            status, body = raw_request(port, f"GET {target} HTTP/1.1\r\nHost: {own}\r\nConnection: close\r\n\r\n")
            assert status == 400 and "not a page address" in json.loads(body)["error"], target
        for target, host in ((f"http://{own}/api/run", own), (f"http://LOCALHOST:{port}/api/run", f"localhost:{port}"),
                             ("/api/run", f"[::1]:{port}")):
            status, body = raw_request(port, f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            assert status == 200 and json.loads(body)["run"] == "run", target
        status, body = raw_request(port, f"GET http://{own}/api/pairs?limit=1 HTTP/1.1\r\nHost: {own}\r\nConnection: close\r\n\r\n")
        assert status == 200 and len(json.loads(body)["rows"]) == 1  # the query of an absolute-form target is read
