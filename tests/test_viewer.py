"""`xclip view`: the server's answers equal the run file's, and a real browser shows them (Chromium, driven by
Selenium; those tests are skipped where no browser is installed, and `.ci/run` installs one)."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import h5py
import numpy as np
from conftest import plant_map
import pytest
from PIL import Image
from test_bad_inputs import expect, finished_run, invoke, jsonl_folder, write_config  # noqa: F401  (a fixture)

from xclip.config import load_config
from xclip.errors import ConfigError
from xclip.runner import run
from xclip.viewer import PairQuery, RunData, export_site, make_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def file_columns(run_dir: Path) -> dict[str, np.ndarray]:
    with h5py.File(run_dir / "run.h5", "r") as f:
        pairs = f["pairs"]
        captions = f["captions/text"].asstr()[:]
        return {"score": pairs["score"][:], "status": pairs["status"][:],
                "caption": np.array([captions[c] for c in pairs["caption_index"][:]]),
                "relative": pairs["relative_completeness_error"][:], "interactions": pairs["interactions"][:]}


@pytest.fixture()
def demo_run(tmp_path_factory) -> Path:
    """The demo config, first 40 pairs: enough rows to sort and filter, maps of the trained demo model."""
    root = tmp_path_factory.mktemp("demo")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                         [f"output.directory={root / 'run'}", "data.limit=40"])
    run(config)
    return root / "run"


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


def test_failures_are_listed_with_their_reasons(tmp_path, model_dirs):
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    (tmp_path / "images" / "img1.png").write_bytes(b"not a png")
    run(load_config(write_config(tmp_path, model_dirs["clip"])))
    (failure,) = RunData(tmp_path / "run").failures()
    assert failure["group"] == "images" and failure["item"] == "img1.png" and "img1.png" in failure["reason"]


@contextlib.contextmanager
def serving(run_dir: Path, **options):
    """A server for ``run_dir`` on a free port, in this process (its stderr is the test's)."""
    server = make_server(run_dir, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def server(demo_run):
    with serving(demo_run) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/"


def ask(port: int, path: str, host: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` with the ``Host`` header a browser would send for ``host`` (default: the server's own)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"Host": host} if host else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


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


def test_a_busy_port_is_named(demo_run):
    first = make_server(demo_run, port=0)
    try:
        expect(["view", demo_run, "--port", str(first.server_address[1])], 1, rf"cannot serve on 127.0.0.1:{first.server_address[1]} .*choose another --port")
    finally:
        first.server_close()


def test_only_the_servers_own_host_is_answered(finished_run):  # noqa: F811
    with serving(finished_run) as server:
        port = server.server_address[1]
        for path in ("/", "/api/run", "/api/pair/0/image.png"):
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


def test_images_outside_the_data_root_are_not_served(finished_run):  # noqa: F811
    root = finished_run.parent / "images"
    with h5py.File(finished_run / "run.h5", "r") as f:
        image = int(f["pairs/image_index"][0])
        stored = f["images/path"].asstr()[image]
    outside = shutil.copyfile(root / stored, finished_run.parent / "outside.png")  # the same pixels, out of the root
    (root / "link.png").symlink_to(outside)
    (root / "alias.png").symlink_to(root / stored)  # a link that stays inside is served
    with serving(finished_run) as server:
        for path, expected in (("../outside.png", 403), (str(outside), 403), ("link.png", 403), ("alias.png", 200), (stored, 200)):
            with h5py.File(finished_run / "run.h5", "r+") as f:
                f["images/path"][image] = path
            status, body = ask(server.server_address[1], "/api/pair/0/image.png")
            assert status == expected, path
            if expected == 403:
                assert "lies outside the data root" in json.loads(body)["error"], path


def test_a_stalled_client_is_disconnected(finished_run):  # noqa: F811
    with serving(finished_run, socket_timeout=0.5) as server:
        for sent in (b"", b"GET /api/ru"):  # nothing, half a request line
            with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5) as client:
                client.sendall(sent)
                start = time.monotonic()
                assert client.recv(1024) == b"", sent  # closed by the server: our own 5 s would raise instead
                assert time.monotonic() - start < 3, sent
        assert ask(server.server_address[1], "/api/run")[0] == 200


def test_a_client_that_leaves_mid_answer_prints_no_traceback(finished_run, capfd):  # noqa: F811
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


def test_export_writes_the_top_and_bottom_pairs(demo_run, tmp_path):
    code, output = invoke("view", demo_run, "--export", tmp_path / "site", "--top", "3", "--bottom", "2")
    assert code == 0, output
    text = (tmp_path / "site" / "data.js").read_text()
    site = json.loads(text.removeprefix("window.XCLIP_STATIC = ").removesuffix(";\n"))
    score = file_columns(demo_run)["score"]
    order = np.argsort(-score, kind="stable").tolist()
    assert [row["index"] for row in site["rows"]] == order[:3] + order[::-1][:2]  # best first, then worst first
    assert sorted(map(int, site["pairs"])) == sorted(order[:3] + order[-2:])
    assert sorted(f.name for f in (tmp_path / "site").iterdir()) == ["data.js", "index.html", "viewer.css", "viewer.js"]
    export_site(demo_run, tmp_path / "one", [5])
    assert '"5"' in (tmp_path / "one" / "data.js").read_text()


# --- a real browser -------------------------------------------------------------------------------------------
# skipped without a browser, except where XCLIP_REQUIRE_BROWSER is set (CI): there a missing browser fails them
browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("XCLIP_REQUIRE_BROWSER"),
                             reason="needs Debian's chromium and chromium-driver")


@pytest.fixture()
def driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield chrome
    chrome.quit()


def wait_for(condition, timeout: float = 60.0):  # generous: CI machines are slow and shared
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("the page did not get there in time")


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
def test_the_browser_shows_the_files_values_for_spans_and_boxes(finished_run, driver):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    process, url = view_command(finished_run)
    try:
        driver.get(url)
        wait_for(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        columns = file_columns(finished_run)
        driver.find_element(By.CSS_SELECTOR, 'th[data-sort="score"]').click()  # sorted by score, best first
        wait_for(lambda: "sorted-desc" in driver.find_element(By.CSS_SELECTOR, 'th[data-sort="score"]').get_attribute("class"))
        shown = [int(tr.get_attribute("data-index")) for tr in driver.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")]
        assert shown == np.argsort(-columns["score"], kind="stable").tolist()
        driver.find_element(By.ID, "filter-text").send_keys("blue")
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")) == 1)

        driver.find_element(By.ID, "filter-text").clear()
        driver.find_element(By.ID, "filter-text").send_keys("red")
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")) == 2)
        driver.find_element(By.CSS_SELECTOR, '#pairs tbody tr[data-index="0"]').click()
        wait_for(lambda: driver.find_element(By.ID, "pair").get_attribute("data-index") == "0")
        assert float(driver.find_element(By.ID, "score").get_attribute("data-value")) == pytest.approx(float(columns["score"][0]), abs=1e-7)

        # drag across "red dog": the span's total is the file's sum over those tokens and all patches
        chips = {chip.text: chip for chip in driver.find_elements(By.CSS_SELECTOR, ".chip")}
        ActionChains(driver).click_and_hold(chips["red"]).move_to_element(chips["dog"]).release().perform()
        wait_for(lambda: driver.find_element(By.ID, "selection-text").text == "red dog")
        rows = [int(r) for r in driver.find_element(By.ID, "selection-text").get_attribute("data-rows").split(",")]
        maps = columns["interactions"][0]
        assert rows == [2, 3]  # <|startoftext|> a red dog <|endoftext|>
        total = float(driver.find_element(By.ID, "selection-total").get_attribute("data-value"))
        assert total == pytest.approx(float(maps[rows, 1:].astype(np.float64).sum()), rel=1e-6)

        # a box over the image's top-left quarter: each word's value is the file's sum over the box's patches
        layer = driver.find_element(By.ID, "box-layer")
        size = layer.size
        ActionChains(driver).move_to_element_with_offset(layer, -size["width"] // 2 + 5, -size["height"] // 2 + 5) \
            .click_and_hold().move_by_offset(size["width"] // 2 - 10, size["height"] // 2 - 10).release().perform()
        wait_for(lambda: driver.find_element(By.ID, "box-info").is_displayed())
        patches = json.loads(driver.find_element(By.ID, "box-patches").get_attribute("data-patches"))
        weights = np.array(json.loads(driver.find_element(By.ID, "box-patches").get_attribute("data-weights")))
        assert patches == [0, 1, 4, 5]  # the 4 x 4 grid's top-left quarter
        # the box starts 5 px inside the corner and ends 5 px short of the middle: partial shares of the four
        assert np.flatnonzero(weights).tolist() == patches and ((weights[patches] > 0.5) & (weights[patches] < 1)).all()
        for chip in driver.find_elements(By.CSS_SELECTOR, ".chip"):
            chip_rows = [int(r) for r in chip.get_attribute("data-rows").split(",")]
            expected = float((maps[np.ix_(chip_rows, [1 + p for p in patches])].astype(np.float64) @ weights[patches]).sum())
            assert float(chip.get_attribute("data-value")) == pytest.approx(expected, rel=1e-6, abs=1e-12), chip.text
    finally:
        process.terminate()
        process.wait(timeout=30)


@browser
def test_the_map_is_drawn_where_the_planted_values_are(finished_run, driver):  # noqa: F811
    from selenium.webdriver.common.by import By

    plant_corner(finished_run, 0, "red</w>")
    process, url = view_command(finished_run)
    try:
        driver.get(url)
        wait_for(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        driver.find_element(By.CSS_SELECTOR, '#pairs tbody tr[data-index="0"]').click()
        chips = wait_for(lambda: {c.text: c for c in driver.find_elements(By.CSS_SELECTOR, ".chip")} or None)
        chips["red"].click()
        wait_for(lambda: driver.find_element(By.ID, "map").get_attribute("data-rows") == "2")
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
def test_an_exported_site_opens_from_the_file_system(demo_run, tmp_path, driver):
    from selenium.webdriver.common.by import By

    assert invoke("view", demo_run, "--export", tmp_path / "site", "--pair", "3", "--pair", "11")[0] == 0
    driver.get((tmp_path / "site" / "index.html").as_uri())
    wait_for(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    rows = driver.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")
    assert [r.get_attribute("data-index") for r in rows] == ["3", "11"]
    rows[1].click()
    wait_for(lambda: driver.find_element(By.ID, "pair").get_attribute("data-index") == "11")
    score = float(driver.find_element(By.ID, "score").get_attribute("data-value"))
    assert math.isclose(score, float(file_columns(demo_run)["score"][11]), abs_tol=1e-7)
    assert driver.find_element(By.ID, "image").get_attribute("naturalWidth") == "320"
