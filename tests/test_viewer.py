"""`xclip view`: the server's answers equal the run file's, and a real browser shows them (Chromium, driven by
Selenium; those tests are skipped where no browser is installed, and `.ci/run` installs one)."""

from __future__ import annotations

import io
import json
import math
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import h5py
from helpers import (DEMO_CONFIG, WAIT_S, ask, attribute, browser, expect, invoke, jsonl_folder, page_url, plant_map,
                     plant_pair_number, serving, wait_for, wait_settled, write_config)
import numpy as np
import pytest
from PIL import Image

from xclip.config import RunConfig, load_config
from xclip.errors import ConfigError
from xclip.run.runner import run
from xclip.core.geometry import Preprocessing
from xclip.show.figures import draw
from xclip.show.pairs import load_pair_view
from xclip.attribution.result import INEXACT_PAIR_FACTOR
from xclip.store.reader import RunReader
from xclip.show.viewer import PairQuery, RunData, export_site, make_server


def file_columns(run_dir: Path) -> dict[str, np.ndarray]:
    with h5py.File(run_dir / "run.h5", "r") as f:
        pairs = f["pairs"]
        captions = f["captions/text"].asstr()[:]
        return {"score": pairs["score"][:], "status": pairs["status"][:],
                "caption": np.array([captions[c] for c in pairs["caption_index"][:]]),
                "relative": pairs["relative_completeness_error"][:], "interactions": pairs["interactions"][:]}


@pytest.fixture()
def growing_run(tmp_path_factory, monkeypatch) -> tuple[Path, RunConfig]:
    """The demo config's first 40 pairs (every caption against every image), stopped after its first 16 pairs:
    as a viewer sees an ``all`` run mid-way. Pairs are attributed 16 at a time here, so that one batch is not
    the whole run; the file holds zeros in the numbers of the 24 pending pairs, as every unfinished run does."""
    monkeypatch.setattr("xclip.run.runner.PAIR_BATCH", 16)
    root = tmp_path_factory.mktemp("growing")
    config = load_config(DEMO_CONFIG, [f"output.directory={root / 'run'}", "data.limit=40"])
    finished: dict[str, int] = {}
    run(config, on_progress=lambda stage, done, total: finished.__setitem__(stage, done),
        should_stop=lambda: finished.get("pairs", 0) >= 16)
    return root / "run", config


def test_table_queries_sort_and_filter_as_the_file_says(demo_run):
    data, columns = RunData(demo_run), file_columns(demo_run)
    rows = data.pairs(PairQuery(sort="score", descending=True, limit=1000))["rows"]
    assert [r["index"] for r in rows] == np.argsort(-columns["score"], kind="stable").tolist()
    assert [r["score"] for r in rows] == sorted(columns["score"].tolist(), reverse=True)
    blue = data.pairs(PairQuery(text="BLUE", min_score=0.3, limit=1000))
    expected = [i for i, (c, s) in enumerate(zip(columns["caption"], columns["score"])) if "blue" in c and s >= 0.3]
    assert [r["index"] for r in blue["rows"]] == expected and blue["total"] == len(expected)
    page = data.pairs(PairQuery(sort="caption", offset=10, limit=5))
    by_caption = sorted(range(40), key=lambda i: columns["caption"][i].lower())
    assert [r["index"] for r in page["rows"]] == by_caption[10:15]
    strict = data.pairs(PairQuery(max_error=float(np.median(columns["relative"])), limit=1000))
    assert strict["total"] == int((columns["relative"] <= np.median(columns["relative"])).sum())


def test_a_pair_answer_holds_the_files_map_and_numbers(demo_run):
    answer, columns = RunData(demo_run).pair(7), file_columns(demo_run)
    n = len(answer["tokens"])
    assert (np.asarray(answer["interactions"]) == columns["interactions"][7, :n]).all()  # exactly
    assert answer["score"] == float(columns["score"][7])
    assert [chip["text"] for chip in answer["chips"]][0] == "<|startoftext|>"
    assert sorted(r for chip in answer["chips"] for r in chip["rows"]) == list(range(n))  # every token once


@pytest.mark.slow  # a run of the demo model
def test_an_inexact_pair_map_is_named_by_inspect_the_viewer_and_its_figure(demo_run):
    """A pair whose map error bound passes INEXACT_PAIR_FACTOR x the tolerance is listed by `xclip inspect`, carries
    the note in the viewer's answer and in its figure; the pairs under it carry none. One planted bound (30% of the
    map) beside the real ones of the trained demo model."""
    with h5py.File(demo_run / "run.h5", "r+") as f:
        plant_pair_number(f, 5, "map_error_bound", 0.3)
        bounds = f["pairs/map_error_bound"][:]
    tolerance = 1e-3  # the demo config's, the default
    inexact = [int(i) for i in np.flatnonzero(bounds > INEXACT_PAIR_FACTOR * tolerance)]
    assert 5 in inexact and len(inexact) < len(bounds)
    exit_code, output = invoke("inspect", demo_run, "--json")
    assert exit_code == 0
    listed = json.loads(output)["accuracy"]["pairs"]["inexact"]
    assert [pair["index"] for pair in listed] == inexact
    assert next(p for p in listed if p["index"] == 5)["map_error_bound"] == pytest.approx(0.3)
    flat = " ".join(invoke("inspect", demo_run)[1].split())
    assert f"{len(inexact)} pair map(s) may be off by more than 10 x the tolerance 0.001" in flat
    assert "pair 5 (" in flat and "map error bound 3.00e-01" in flat
    exact = next(i for i in range(len(bounds)) if i not in inexact)
    data = RunData(demo_run)
    assert data.pair(5)["inexact_note"].startswith("this map may be off by up to 30.0% of its own size")
    assert data.pair(exact)["inexact_note"] is None
    with RunReader(demo_run) as run:
        noted, clean = draw(load_pair_view(run, 5, None)), draw(load_pair_view(run, exact, None))
    assert any(w.startswith("this map may be off by up to 30.0%") for w in noted.warnings)
    assert not any("may be off" in w for w in clean.warnings)


def test_a_run_being_written_shows_what_is_finished(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    config = load_config(write_config(tmp_path, model_dirs["clip"]))
    run(config, should_stop=lambda: True)  # created, nothing attributed: as a viewer sees a run that just started
    data = RunData(tmp_path / "run")
    assert data.summary()["counts"]["pairs"] == {"pending": 3, "done": 0, "failed": 0, "total": 3}
    assert [r["status"] for r in data.pairs(PairQuery())["rows"]] == ["pending"] * 3
    with pytest.raises(ConfigError, match="pair 0 is not a finished pair"):
        data.pair(0)
    run(config)  # the same viewer, the next request: finished
    assert data.summary()["counts"]["pairs"]["done"] == 3


def test_unfinished_pairs_have_no_values_and_never_sort_among_finished_ones(growing_run):
    run_dir, _ = growing_run
    columns, data = file_columns(run_dir), RunData(run_dir)
    pending = columns["status"] == 0
    assert pending.sum() == 24 and (columns["score"][pending] == 0).all()  # zeros in the file, not NaN
    rows = data.pairs(PairQuery(limit=1000))["rows"]
    pending_rows = [row for row in rows if row["status"] == "pending"]
    assert len(pending_rows) == 24
    assert all(row[name] is None for row in pending_rows
               for name in ("score", "four_term_value", "completeness_error", "relative_completeness_error"))
    done = np.flatnonzero(~pending)
    for sort, column in (("score", "score"), ("relative_completeness_error", "relative")):
        expected = done[np.argsort(columns[column][done], kind="stable")].tolist()
        for descending in (False, True):  # finished pairs first either way, in their order, then the pending ones
            order = [row["index"] for row in data.pairs(PairQuery(sort=sort, descending=descending, limit=1000))["rows"]]
            assert order[: len(done)] == (expected[::-1] if descending else expected), (sort, descending)
    # a score or error filter keeps only pairs that have one
    assert [r["index"] for r in data.pairs(PairQuery(min_score=-10, limit=1000))["rows"]] == done.tolist()
    assert data.pairs(PairQuery(max_error=1.0, limit=1000))["total"] == len(done)


def test_failures_are_listed_with_their_reasons(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    (tmp_path / "images" / "img1.png").write_bytes(b"not a png")
    run(load_config(write_config(tmp_path, model_dirs["clip"])))
    (failure,) = RunData(tmp_path / "run").failures()
    assert failure["group"] == "images" and failure["item"] == "img1.png" and "img1.png" in failure["reason"]


@pytest.fixture()
def server(demo_run):
    with serving(demo_run) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/"


def get(url: str) -> tuple[int, bytes]:
    return get_with_headers(url)[:2]


def get_with_headers(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def file_images(run_dir: Path) -> tuple[list[str], np.ndarray]:
    """The run's image paths and each pair's image index, as the file stores them."""
    with h5py.File(run_dir / "run.h5", "r") as f:
        return list(f["images/path"].asstr()[:]), f["pairs/image_index"][:]


def test_the_server_answers_and_refuses_clearly(server, demo_run):
    status, body = get(server + "api/pairs?sort=score&order=desc&limit=3")
    assert status == 200 and [r["index"] for r in json.loads(body)["rows"]] == np.argsort(-file_columns(demo_run)["score"], kind="stable")[:3].tolist()
    assert get(server + "api/pairs?sort=colour")[0] == 400
    assert "sort must be one of" in json.loads(get(server + "api/pairs?sort=colour")[1])["error"]
    assert json.loads(get(server + "api/pair/9999")[1])["error"].startswith("pair 9999 is not a finished pair")
    assert get(server + "nothing/here")[0] == 404
    status, png = get(server + "api/pair/0/image.png")
    assert status == 200 and Image.open(io.BytesIO(png)).size == (320, 320)
    status, page = get(server)
    assert status == 200 and b'<script src="viewer.js">' in page and b"http" not in page.replace(b"http-equiv", b"")  # no CDN


@pytest.mark.slow  # a run of the demo model
def test_each_row_names_its_image_with_a_thumbnail_the_browser_keeps(server, demo_run):
    paths, image_index = file_images(demo_run)
    rows = json.loads(get(server + "api/pairs?limit=1000")[1])["rows"]
    assert [row["image"] for row in rows] == [paths[i] for i in image_index]  # relative to the data root
    status, png, headers = get_with_headers(server + rows[5]["thumbnail"])
    original = Image.open(DEMO_CONFIG.parent / "demo" / "scenes" / rows[5]["image"]).convert("RGB")
    assert status == 200 and original.size == (64, 64)  # no larger than the thumbnail: as it is
    assert (np.asarray(Image.open(io.BytesIO(png))) == np.asarray(original)).all()
    assert "immutable" in headers["Cache-Control"] and "max-age" in headers["Cache-Control"]
    assert get_with_headers(server + "api/pair/5/image.png")[2]["Cache-Control"] == "no-store"
    # the address names the picture's content: another content key, or an image that is not finished, is not found
    image = rows[5]["image_index"]
    assert get(server + f"api/image/{image}/thumb.png?v=0123456789abcdef")[0] == 404
    assert get(server + f"api/image/{image}/thumb.png")[0] == 404
    assert get(server + f"api/image/{len(paths)}/thumb.png?v=0")[0] == 404
    by_image = json.loads(get(server + "api/pairs?sort=image&order=desc&limit=1000")[1])["rows"]
    assert [row["image"] for row in by_image] == sorted((paths[i] for i in image_index), key=str.lower, reverse=True)
    with h5py.File(demo_run / "run.h5", "r+") as f:
        f["images/status"][image] = 0  # pending, as in a run still being written
    assert get(server + rows[5]["thumbnail"])[0] == 404
    assert all(row["thumbnail"] is None for row in json.loads(get(server + "api/pairs?limit=1000")[1])["rows"] if row["image_index"] == image)


def test_a_large_image_is_thumbnailed_small(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "wide.png", "text": "a wide picture"}')
    wide = Image.new("RGB", (400, 200), (200, 30, 30))
    wide.paste((30, 30, 200), (200, 0, 400, 200))  # red left, blue right: a flipped or cropped thumbnail shows
    wide.save(tmp_path / "images" / "wide.png")
    run(load_config(write_config(tmp_path, model_dirs["clip"])))
    data = RunData(tmp_path / "run")
    (row,) = [row for row in data.pairs(PairQuery())["rows"] if row["image"] == "wide.png"]
    thumbnail = Image.open(io.BytesIO(data.thumbnail(row["image_index"])))
    assert thumbnail.size == (80, 40) and thumbnail.getpixel((20, 20)) == (200, 30, 30)
    assert thumbnail.getpixel((60, 20)) == (30, 30, 200)


@pytest.mark.slow  # a run of the demo model
def test_a_busy_port_is_named(demo_run):
    first = make_server(demo_run, port=0)
    try:
        expect(["view", demo_run, "--port", str(first.server_address[1])], 1, rf"cannot serve on 127.0.0.1:{first.server_address[1]} .*choose another --port")
    finally:
        first.server_close()


def test_only_the_servers_own_host_is_answered(finished_run):
    with serving(finished_run) as server:
        port = server.server_address[1]
        thumbnail = "/" + json.loads(ask(port, "/api/pairs")[1])["rows"][0]["thumbnail"]
        for path in ("/", "/api/run", "/api/pair/0/image.png", thumbnail):
            for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"127.0.0.1:{port + 1}"):
                status, body = ask(port, path, host)  # a page of a site rebound to 127.0.0.1 sends its own name
                assert status == 421 and "this server answers only" in json.loads(body)["error"], (path, host)
            for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
                assert ask(port, path, host)[0] == 200, (path, host)


def test_no_answer_holds_a_path_of_the_machine(tmp_path, tmp_path_factory, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "missing.png", "text": "a cat"}')  # its reason names the absolute path
    run(load_config(write_config(tmp_path, model_dirs["clip"])))
    with serving(tmp_path / "run") as server:
        port = server.server_address[1]
        answers = {path: ask(port, path) for path in ("/api/run", "/api/pairs", "/api/pair/0", "/api/failures", "/api/pair/2")}
        (tmp_path / "images" / "img0.png").rename(tmp_path / "img0.png")  # a moved image: its error names it
        answers["/api/pair/0/image.png"] = ask(port, "/api/pair/0/image.png")
    for path, (_, body) in answers.items():
        assert str(tmp_path_factory.getbasetemp()) not in body.decode(), path  # nor any part of the tests' folder
    assert [status for status, _ in answers.values()] == [200, 200, 200, 200, 404, 404]
    assert json.loads(answers["/api/run"][1])["run"] == "run"
    (failure,) = json.loads(answers["/api/failures"][1])
    assert failure["item"] == "missing.png" and failure["reason"].endswith(": missing.png"), failure
    row = json.loads(answers["/api/pairs"][1])["rows"][2]
    assert row["error"].startswith("image 2 failed: "), row  # the stored reason is cut at 100 bytes: maybe mid-path
    cut_reason = f"image 2 failed: image file not found: {tmp_path}"[:-3]  # cut within the data root's folders
    assert RunData(tmp_path / "run").public(cut_reason) == "image 2 failed: image file not found: …"


@pytest.mark.slow  # a run of the demo model
def test_every_pair_route_refuses_other_indices(demo_run):
    with h5py.File(demo_run / "run.h5", "r+") as f:
        f["pairs/status"][5] = 0  # pending, as in a run still being written
    with serving(demo_run) as server:
        port = server.server_address[1]
        for index in ("-1", "40", "99999999999999999999", "1.5", "abc", "+1", "%31", "5"):  # 40 pairs
            for route in ("", "/image.png", "/contours.png"):
                status, body = ask(port, f"/api/pair/{index}{route}")
                assert status == 404 and json.loads(body)["error"], (index, route)
        assert [ask(port, f"/api/pair/39{route}")[0] for route in ("", "/image.png", "/contours.png")] == [200] * 3


def test_images_outside_the_data_root_are_not_served(finished_run):
    root = finished_run.parent / "images"
    with h5py.File(finished_run / "run.h5", "r") as f:
        image = int(f["pairs/image_index"][0])
        stored = f["images/path"].asstr()[image]
    outside = shutil.copyfile(root / stored, finished_run.parent / "outside.png")  # the same pixels, out of the root
    (root / "link.png").symlink_to(outside)
    (root / "alias.png").symlink_to(root / stored)  # a link that stays inside is served
    with serving(finished_run) as server:
        port = server.server_address[1]
        thumbnail = "/" + json.loads(ask(port, "/api/pairs")[1])["rows"][0]["thumbnail"]
        for path, expected in (("../outside.png", 403), (str(outside), 403), ("link.png", 403), ("alias.png", 200), (stored, 200)):
            with h5py.File(finished_run / "run.h5", "r+") as f:
                f["images/path"][image] = path
            for route in ("/api/pair/0/image.png", thumbnail):
                status, body = ask(port, route)
                assert status == expected, (path, route)
                if expected == 403:
                    assert "lies outside the data root" in json.loads(body)["error"], (path, route)


@pytest.mark.slow  # waits out the server's socket timeout
def test_a_stalled_client_is_disconnected(finished_run):
    with serving(finished_run, socket_timeout=0.5) as server:
        for sent in (b"", b"GET /api/ru"):  # nothing, half a request line
            with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=60) as client:
                client.sendall(sent)
                start = time.monotonic()
                assert client.recv(1024) == b"", sent  # closed by the server: our own 60 s would raise instead
                assert time.monotonic() - start < 10, sent  # the server's 0.5 s, with room for a loaded machine
        assert ask(server.server_address[1], "/api/run")[0] == 200


@pytest.mark.slow  # waits for the server's threads to end
def test_a_client_that_leaves_mid_answer_prints_no_traceback(finished_run, capfd):
    with serving(finished_run) as server:
        port = server.server_address[1]
        for path in ("/api/pair/0/image.png", "/api/pair/0", "/api/pairs?limit=1000"):
            for _ in range(3):
                client = socket.create_connection(("127.0.0.1", port), timeout=5)
                client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
                client.close()
        deadline = time.monotonic() + 30
        while any("process_request_thread" in t.name for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ask(port, "/api/run")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow  # a run of the demo model and two exports
def test_export_writes_the_top_and_bottom_pairs(demo_run, tmp_path):
    code, output = invoke("view", demo_run, "--export", tmp_path / "site", "--top", "3", "--bottom", "2")
    assert code == 0, output
    text = (tmp_path / "site" / "data.js").read_text()
    site = json.loads(text.removeprefix("window.XCLIP_STATIC = ").removesuffix(";\n"))
    score = file_columns(demo_run)["score"]
    order = np.argsort(-score, kind="stable").tolist()
    assert [row["index"] for row in site["rows"]] == order[:3] + order[::-1][:2]  # best first, then worst first
    assert sorted(map(int, site["pairs"])) == sorted(order[:3] + order[-2:])
    assert sorted(f.name for f in (tmp_path / "site").iterdir()) == ["data.js", "index.html", "thumbnails", "viewer.css", "viewer.js"]
    images = file_images(demo_run)[1]
    assert {row["thumbnail"] for row in site["rows"]} == {f"thumbnails/{images[row['index']]}.png" for row in site["rows"]}
    assert sorted(f.name for f in (tmp_path / "site" / "thumbnails").iterdir()) == sorted({f"{images[row['index']]}.png" for row in site["rows"]})
    export_site(demo_run, tmp_path / "one", [5])
    assert '"5"' in (tmp_path / "one" / "data.js").read_text()


# --- a real browser -------------------------------------------------------------------------------------------
def table(driver) -> list[dict]:
    """The pair table's rows as shown, read at one instant: index and the text of each cell."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#pairs tbody tr')]"
        ".map((tr) => ({index: Number(tr.dataset.index), cells: [...tr.cells].map((td) => td.textContent)}))")


def view_command(run_dir: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "xclip", "view", str(run_dir), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def plant_corner(run_dir: Path, pair: int, token: str) -> list[int]:
    """Pair ``pair``'s map: ``token`` meets the top-left patch with 1.0, nothing else interacts."""
    with h5py.File(run_dir / "run.h5", "r+") as f:
        caption = int(f["pairs/caption_index"][pair])
        tokens = list(f["captions/tokens"].asstr()[caption, : f["captions/n_positions"][caption]])
        planted = np.zeros_like(f["pairs/interactions"][pair])
        planted[tokens.index(token), 1] = 1.0
        plant_map(f, pair, planted)
    return [tokens.index(token)]


@browser
def test_the_browser_shows_the_files_values_for_spans_and_boxes(finished_run, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    process, url = view_command(finished_run)
    try:
        driver.get(url)
        wait_settled(driver)
        columns = file_columns(finished_run)
        driver.find_element(By.CSS_SELECTOR, 'th[data-sort="score"]').click()  # sorted by score, best first
        wait_settled(driver, lambda: "sorted-desc" in driver.find_element(By.CSS_SELECTOR, 'th[data-sort="score"]').get_attribute("class"))
        assert [row["index"] for row in table(driver)] == np.argsort(-columns["score"], kind="stable").tolist()
        driver.find_element(By.ID, "filter-text").send_keys("blue")
        wait_settled(driver)
        assert len(table(driver)) == 1

        driver.find_element(By.ID, "filter-text").clear()
        driver.find_element(By.ID, "filter-text").send_keys("red")
        wait_settled(driver)
        assert len(table(driver)) == 2
        driver.find_element(By.CSS_SELECTOR, '#pairs tbody tr[data-index="0"]').click()
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "0")
        assert float(attribute(driver, "score", "data-value")) == pytest.approx(float(columns["score"][0]), abs=1e-7)
        assert driver.current_url == url + "#pair=0"  # each view has its own address

        # drag across "red dog": the span's total is the file's sum over those tokens and all patches
        chips = {chip.text: chip for chip in driver.find_elements(By.CSS_SELECTOR, ".chip")}
        ActionChains(driver).click_and_hold(chips["red"]).move_to_element(chips["dog"]).release().perform()
        wait_settled(driver, lambda: driver.find_element(By.ID, "selection-text").text == "red dog")
        rows = [int(r) for r in attribute(driver, "selection-text", "data-rows").split(",")]
        maps = columns["interactions"][0]
        assert rows == [2, 3]  # <|startoftext|> a red dog <|endoftext|>
        total = float(attribute(driver, "selection-total", "data-value"))
        assert total == pytest.approx(float(maps[rows, 1:].astype(np.float64).sum()), rel=1e-6)
        assert driver.current_url == url + "#pair=0&span=red%20dog"

        # a box over the image's top-left quarter: each word's value is the file's sum over the box's patches
        layer = driver.find_element(By.ID, "box-layer")
        size = layer.size
        ActionChains(driver).move_to_element_with_offset(layer, -size["width"] // 2 + 5, -size["height"] // 2 + 5) \
            .click_and_hold().move_by_offset(size["width"] // 2 - 10, size["height"] // 2 - 10).release().perform()
        wait_settled(driver, lambda: driver.find_element(By.ID, "box-info").is_displayed())
        patches = json.loads(attribute(driver, "box-patches", "data-patches"))
        weights = np.array(json.loads(attribute(driver, "box-patches", "data-weights")))
        assert patches == [0, 1, 4, 5]  # the 4 x 4 grid's top-left quarter
        # the box starts 5 px inside the corner and ends 5 px short of the middle: partial shares of the four
        assert np.flatnonzero(weights).tolist() == patches and ((weights[patches] > 0.5) & (weights[patches] < 1)).all()
        values = {}
        for chip in driver.find_elements(By.CSS_SELECTOR, ".chip"):
            chip_rows = [int(r) for r in chip.get_attribute("data-rows").split(",")]
            expected = float((maps[np.ix_(chip_rows, [1 + p for p in patches])].astype(np.float64) @ weights[patches]).sum())
            values[chip.text] = float(chip.get_attribute("data-value"))
            assert values[chip.text] == pytest.approx(expected, rel=1e-6, abs=1e-12), chip.text
        box = driver.current_url.removeprefix(url + "#pair=0&span=red%20dog&box=")
        assert len(box.split(",")) == 4 and all(v.isdigit() for v in box.split(","))  # whole pixels

        # the words' colour scale: from minus to plus the largest magnitude of a word's value, in the chips' colours
        peak = max(abs(v) for v in values.values())
        assert float(attribute(driver, "box-legend-bar", "data-halfrange")) == pytest.approx(peak, rel=1e-12)
        low, high = driver.find_element(By.ID, "box-legend-low").text, driver.find_element(By.ID, "box-legend-high").text
        assert low[0] == "−" and high[0] == "+" and float(high[1:]) == pytest.approx(peak, rel=0.05) == float(low[1:])
        legend = np.asarray(Image.open(io.BytesIO(driver.find_element(By.ID, "box-legend-bar").screenshot_as_png)).convert("RGB")).astype(int)
        lut = [tuple(int(h[k : k + 2], 16) for k in (1, 3, 5)) for h in RunData(finished_run).summary()["lut"]]
        middle = legend.shape[0] // 2
        assert np.abs(legend[middle, 2] - lut[0]).max() <= 3 and np.abs(legend[middle, -3] - lut[-1]).max() <= 3
        strongest = max(values, key=lambda text: abs(values[text]))
        colour = driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", chips[strongest])
        assert colour == "rgb({}, {}, {})".format(*(lut[-1] if values[strongest] > 0 else lut[0]))  # the scale's end
    finally:
        process.terminate()
        process.wait(timeout=30)


@browser
def test_the_map_is_drawn_where_the_planted_values_are(finished_run, driver):
    from selenium.webdriver.common.by import By

    plant_corner(finished_run, 0, "red</w>")
    process, url = view_command(finished_run)
    try:
        driver.get(url)
        wait_settled(driver)
        driver.find_element(By.CSS_SELECTOR, '#pairs tbody tr[data-index="0"]').click()
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "0")
        chips = {c.text: c for c in driver.find_elements(By.CSS_SELECTOR, ".chip")}
        chips["red"].click()
        wait_settled(driver, lambda: attribute(driver, "map", "data-rows") == "2")
        shot = np.asarray(Image.open(io.BytesIO(driver.find_element(By.ID, "map").screenshot_as_png)).convert("RGB")).astype(int)
        height, width, _ = shot.shape
        darkest_red = np.array([103, 0, 31])  # RdBu_r at +1 on a scale of +-1 ("this map")
        corner = shot[: height // 16, : width // 16].reshape(-1, 3)
        far = shot[height // 2 :, width // 2 :].reshape(-1, 3)
        # the top-left patch's centre is the darkest red; the lower right quarter, with no value, is the bar's white
        assert (np.abs(corner - darkest_red).max(1) <= 3).mean() > 0.5
        white = np.array([247, 247, 247])  # RdBu_r's middle (its 128th colour)
        outline = (far == [45, 45, 45]).all(1)
        assert (np.abs(far[~outline] - white).max(1) <= 3).mean() > 0.95
    finally:
        process.terminate()
        process.wait(timeout=30)


@browser
def test_the_map_title_names_the_word_under_the_pointer(finished_run, driver):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    with serving(finished_run) as server:
        driver.get(page_url(server) + "#pair=0")
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "0")
        chips = {chip.text: chip for chip in driver.find_elements(By.CSS_SELECTOR, ".chip")}
        ActionChains(driver).move_to_element(chips["dog"]).perform()
        wait_settled(driver, lambda: attribute(driver, "map", "data-rows") == "3")  # <|startoftext|> a red dog
        assert driver.find_element(By.ID, "map-title").text == "map of “dog” (under the pointer)"
        ActionChains(driver).move_to_element(driver.find_element(By.ID, "pair-title")).perform()  # off the caption
        wait_settled(driver, lambda: attribute(driver, "map", "data-rows") == "1,2,3")
        assert driver.find_element(By.ID, "map-title").text == "map of: all words"


@browser
def test_a_link_reopens_its_pair_span_and_box(finished_run, driver):
    from selenium.webdriver.common.by import By

    maps = file_columns(finished_run)["interactions"][0].astype(np.float64)
    with serving(finished_run) as server:
        url = page_url(server)
        driver.get(url + "#pair=0&span=red%20dog")  # a link loaded into a new page
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "0")
        assert driver.find_element(By.ID, "selection-text").text == "red dog"
        assert [chip.text for chip in driver.find_elements(By.CSS_SELECTOR, ".chip.selected")] == ["red", "dog"]
        assert attribute(driver, "map", "data-rows") == "2,3"
        assert float(attribute(driver, "selection-total", "data-value")) == pytest.approx(maps[[2, 3], 1:].sum(), rel=1e-6)
        assert not driver.find_element(By.ID, "box-info").is_displayed()

        driver.execute_script("window.samePage = true")
        driver.get(url + "#pair=0&box=5,5,155,155")  # a link pasted into the same page: no reload, the view follows
        wait_settled(driver, lambda: driver.find_element(By.ID, "box-info").is_displayed())
        assert driver.execute_script("return window.samePage === true")
        assert driver.find_element(By.ID, "selection-text").text == "all words"
        patches = json.loads(attribute(driver, "box-patches", "data-patches"))
        weights = np.array(json.loads(attribute(driver, "box-patches", "data-weights")))
        assert patches == [0, 1, 4, 5]  # 80-pixel patches of the 320-pixel view, each 75 pixels a side inside
        assert weights[patches] == pytest.approx([(75 / 80) ** 2] * 4)
        for chip in driver.find_elements(By.CSS_SELECTOR, ".chip"):
            chip_rows = [int(r) for r in chip.get_attribute("data-rows").split(",")]
            expected = float((maps[np.ix_(chip_rows, [1 + p for p in patches])] @ weights[patches]).sum())
            assert float(chip.get_attribute("data-value")) == pytest.approx(expected, rel=1e-6, abs=1e-12), chip.text
        assert driver.current_url == url + "#pair=0&box=5,5,155,155"

        driver.back()  # the link before: its span, no box
        wait_settled(driver, lambda: driver.find_element(By.ID, "selection-text").text == "red dog")
        assert not driver.find_element(By.ID, "box-info").is_displayed()

        driver.find_element(By.CSS_SELECTOR, '#pairs tbody tr[data-index="2"]').click()
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "2")
        assert driver.current_url == url + "#pair=2"

        driver.get(url + "#pair=0&span=blue%20cat")  # words the caption does not hold: said, and the whole caption shown
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "0")
        assert "“blue cat” is not in pair 0's caption" in driver.find_element(By.ID, "notice").text
        assert driver.find_element(By.ID, "selection-text").text == "all words"
        assert driver.current_url == url + "#pair=0"


class LateStaleReplies:
    """A server's data whose table replies to filters other than ``final`` wait until the reply to ``final`` has
    left: the replies to earlier keystrokes arrive after the last one's, as from a busy server."""

    def __init__(self, data: RunData, final: float) -> None:
        self.data, self.final = data, final
        self.armed = False  # until set, every reply is at once (the page's first load)
        self.final_answered = threading.Event()
        self.answered: list[float] = []  # the filters, in the order their replies left

    def __getattr__(self, name: str):
        return getattr(self.data, name)

    def pairs(self, query: PairQuery) -> dict:
        if self.armed and query.min_score != self.final:
            self.final_answered.wait(WAIT_S)
            time.sleep(0.5)  # the final reply is sent first
        answer = self.data.pairs(query)
        self.answered.append(query.min_score)
        if query.min_score == self.final:
            self.final_answered.set()
        return answer


@browser
def test_filters_typed_faster_than_replies_show_the_last_filters_rows(demo_run, driver):
    from selenium.webdriver.common.by import By

    final, data = "0.45", RunData(demo_run)
    expected = [row["index"] for row in data.pairs(PairQuery(min_score=float(final)))["rows"]]
    for typed in ("", "0", "0.4"):  # each earlier keystroke's rows differ: one shown last would be seen
        assert [row["index"] for row in data.pairs(PairQuery.from_params({"min_score": [typed]}))["rows"]] != expected
    with serving(demo_run) as server:
        slow = LateStaleReplies(data, float(final))
        server.RequestHandlerClass.data = slow
        driver.get(page_url(server))
        wait_settled(driver)
        slow.armed = True
        driver.find_element(By.ID, "min-score").send_keys(final)  # a request per key
        wait_settled(driver)  # every reply has arrived, the stale ones last
        assert len(slow.answered) >= 3 and slow.answered[-1] != float(final)
        assert [row["index"] for row in table(driver)] == expected


@browser
def test_the_table_names_each_pairs_image_with_a_thumbnail(demo_run, server, driver):
    from selenium.webdriver.common.by import By

    paths, image_index = file_images(demo_run)
    driver.get(server)
    wait_settled(driver)
    rows = table(driver)
    assert [row["cells"][2] for row in rows] == [paths[image_index[row["index"]]] for row in rows]
    thumbnail = driver.find_element(By.CSS_SELECTOR, '#pairs tbody tr[data-index="0"] td.image img')
    wait_for(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth === 64", thumbnail))  # the scene's own size
    driver.find_element(By.CSS_SELECTOR, '#pairs tbody tr[data-index="3"]').click()
    wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "3")
    caption = file_columns(demo_run)["caption"][3]
    assert driver.find_element(By.ID, "pair-title").text == f"pair 3: “{caption}” · {paths[image_index[3]]}"


@browser
def test_pending_pairs_show_no_values_and_appear_as_they_finish(growing_run, driver):
    from selenium.webdriver.common.by import By

    run_dir, config = growing_run
    with serving(run_dir) as server:
        driver.get(page_url(server))
        wait_settled(driver)
        rows = table(driver)
        pending = [row for row in rows if row["cells"][5] == "pending"]
        assert len(pending) == 24 and all(row["cells"][3] == row["cells"][4] == "" for row in pending)  # no 0.000
        assert all(row["cells"][3] and row["cells"][4] for row in rows if row["cells"][5] == "done")
        header = driver.find_element(By.CSS_SELECTOR, 'th[data-sort="relative_completeness_error"]')
        header.click()  # smallest error first: the finished pairs, not the pending ones' zeros
        wait_settled(driver, lambda: "sorted-asc" in header.get_attribute("class"))
        assert [row["cells"][5] for row in table(driver)] == ["done"] * 16 + ["pending"] * 24
        run(config)  # the run goes on: the page, which polls while pairs are pending, shows them as they finish
        wait_settled(driver, lambda: [row["cells"][5] for row in table(driver)] == ["done"] * 40)
        relative = file_columns(run_dir)["relative"]
        assert [row["index"] for row in table(driver)] == np.argsort(relative, kind="stable").tolist()


@browser
def test_an_exported_site_opens_from_the_file_system(demo_run, tmp_path, driver):
    from selenium.webdriver.common.by import By

    assert invoke("view", demo_run, "--export", tmp_path / "site", "--pair", "3", "--pair", "11")[0] == 0
    site = (tmp_path / "site" / "index.html").as_uri()
    paths, image_index = file_images(demo_run)
    driver.get(site)
    wait_settled(driver)
    rows = table(driver)
    assert [row["index"] for row in rows] == [3, 11]
    assert [row["cells"][2] for row in rows] == [paths[image_index[3]], paths[image_index[11]]]
    wait_for(lambda: driver.execute_script(
        "return [...document.querySelectorAll('#pairs td.image img')].every((img) => img.complete && img.naturalWidth === 64)"))
    driver.find_element(By.CSS_SELECTOR, '#pairs tbody tr[data-index="11"]').click()
    wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "11")
    score = float(attribute(driver, "score", "data-value"))
    assert math.isclose(score, float(file_columns(demo_run)["score"][11]), abs_tol=1e-7)
    assert attribute(driver, "image", "naturalWidth") == "320"
    caption = file_columns(demo_run)["caption"][11]
    assert driver.find_element(By.ID, "pair-title").text == f"pair 11: “{caption}” · {paths[image_index[11]]}"
    assert driver.current_url == site + "#pair=11"
    chips = driver.find_elements(By.CSS_SELECTOR, ".chip")
    second_a = [chip.get_attribute("data-position") for chip in chips if chip.text == "a"][1]  # “two objects: a … and a …”
    driver.find_element(By.CSS_SELECTOR, f'.chip[data-position="{second_a}"]').click()
    wait_settled(driver, lambda: driver.current_url == site + f"#pair=11&span=a&at={second_a}")  # which "a" it is
    driver.refresh()
    wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "11")
    assert [chip.get_attribute("data-position") for chip in driver.find_elements(By.CSS_SELECTOR, ".chip.selected")] == [second_a]

    # a link into the site: pair 3, its last two words, a box over the view's top-left quarter
    answer = RunData(demo_run).pair(3)
    words = [(position, chip) for position, chip in enumerate(answer["chips"]) if not chip["special"]][-2:]
    assert words[1][0] == words[0][0] + 1
    span = " ".join(chip["text"] for _, chip in words)
    driver.get(site + f"#pair=3&span={urllib.parse.quote(span)}&box=0,0,160,160")
    wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "3" and driver.find_element(By.ID, "box-info").is_displayed())
    assert driver.find_element(By.ID, "selection-text").text == span
    assert attribute(driver, "map", "data-rows") == ",".join(str(r) for _, chip in words for r in chip["rows"])
    rects = np.array(answer["patches"]) * 320
    inside = np.flatnonzero((rects[:, 0] < 160) & (rects[:, 1] < 160)).tolist()
    assert json.loads(attribute(driver, "box-patches", "data-patches")) == inside


def quarter_link(run_dir: Path) -> tuple[str, Preprocessing, tuple[float, float, float, float]]:
    """view_link of pair 0 with its words "red dog" and the top-left quarter of what the model saw."""
    from xclip.show.viewer import view_link

    with RunReader(run_dir) as run:
        tokens, geometry = run.caption_tokens(0), run.preprocessing(run.pair_inputs(0)[1])
    x0, y0, x1, y1 = geometry.crop_box
    quarter = (x0, y0, (x0 + x1) / 2, (y0 + y1) / 2)
    start = tokens.caption.index("red dog")
    return view_link(0, tokens, geometry, span=(start, start + len("red dog")), box=quarter), geometry, quarter


def test_a_view_link_is_written_as_the_page_writes_it(finished_run):
    link, _, _ = quarter_link(finished_run)
    assert link == "#pair=0&span=red%20dog&box=0,0,160,160"  # the view is 320 pixels wide


@browser
def test_a_view_link_written_by_python_opens_that_view(finished_run, driver):
    """evaluate's miss list links into the viewer with xclip.show.viewer.view_link: the page opens what it names."""
    from selenium.webdriver.common.by import By

    link, geometry, quarter = quarter_link(finished_run)
    with serving(finished_run) as server:
        driver.get(page_url(server) + link)
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "0"
                     and driver.find_element(By.ID, "box-info").is_displayed())
        assert driver.find_element(By.ID, "selection-text").text == "red dog"
        patches = json.loads(attribute(driver, "box-patches", "data-patches"))
        assert patches == list(np.flatnonzero(geometry.box_coverage(quarter) > 0)) == [0, 1, 4, 5]


@browser
def test_long_captions_stay_one_line_and_the_pair_stays_in_view(demo_run, driver):
    """A row shows its caption on one line, cut with an ellipsis, the whole caption on hover; a pair chosen low in
    the table is drawn where the reader is, not at the top of the page they scrolled away from."""
    from selenium.webdriver.common.by import By

    captions = file_columns(demo_run)["caption"]
    with serving(demo_run) as server:
        driver.get(page_url(server))
        wait_settled(driver, lambda: len(table(driver)) == 40)
        cells = driver.find_elements(By.CSS_SELECTOR, "#pairs tbody td.caption")
        assert [cell.get_attribute("title") for cell in cells] == list(captions)
        longest = max(cells, key=lambda cell: len(cell.get_attribute("title")))
        assert driver.execute_script("return arguments[0].scrollWidth > arguments[0].clientWidth", longest)  # cut
        lines = driver.execute_script("const range = document.createRange(); range.selectNodeContents(arguments[0].firstChild); "
                                      "return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size", longest)
        assert lines == 1
        assert driver.execute_script("return getComputedStyle(arguments[0]).textOverflow", longest) == "ellipsis"

        last = driver.find_element(By.CSS_SELECTOR, '#pairs tbody tr[data-index="39"]')
        driver.execute_script("arguments[0].scrollIntoView({block: 'end'})", last)
        assert driver.execute_script("return window.scrollY") > 0  # the table is longer than the window
        last.click()
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "39")
        top, bottom = driver.execute_script("const r = document.getElementById('pair-title').getBoundingClientRect(); "
                                            "return [r.top, r.bottom]")
        assert 0 <= top and bottom <= driver.execute_script("return window.innerHeight")


@browser
def test_a_link_to_a_pair_the_run_lacks_clears_the_page_and_says_so(demo_run, driver):
    from selenium.webdriver.common.by import By

    with serving(demo_run) as server:
        url = page_url(server)
        driver.get(url + "#pair=3")
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "3")
        driver.get(url + "#pair=999999")
        wait_settled(driver, lambda: driver.find_element(By.ID, "notice").text)
        assert driver.find_element(By.ID, "notice").text == "error: pair 999999 is not a finished pair of this run (40 pairs)"
        assert not driver.find_element(By.ID, "pair").is_displayed()  # pair 3 is not left drawn under the new address
        assert attribute(driver, "pair", "data-index") is None
        assert driver.find_element(By.ID, "placeholder").is_displayed()
        assert not driver.find_elements(By.CSS_SELECTOR, "#pairs tbody tr.current")

        driver.get(url + "#pair=3")  # and a good link draws again
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "3")
        assert driver.find_element(By.ID, "pair").is_displayed() and not driver.find_element(By.ID, "notice").is_displayed()
