"""Plain helpers and constants the test modules share (their fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import xclip
from xclip.cli.app import app
from xclip.analysis.grounding import box_weights, read_annotations
from xclip.core.geometry import Preprocessing
from xclip.core.tokens import CaptionTokens
from xclip.show.viewer import make_server

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red dog", "two blue circle and a square on the cat"]
# the shipped demo model and its held-out demo scenes: a trained model, far less smooth than random weights
DEMO_MODEL = ROOT / "xclip" / "models" / "shapes-clip"
DEMO_SCENES = ROOT / "configs" / "demo" / "scenes"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
GOOD = [("img0.png", "a red dog"), ("img1.png", "two blue circles")]  # two good records in every data case


# --- inputs -------------------------------------------------------------------------------------------------------
def demo_pairs() -> tuple[list[str], list[Path]]:
    """Captions and image paths of the twelve demo scenes, in file order."""
    rows = [json.loads(line) for line in (DEMO_SCENES / "metadata.jsonl").read_text().splitlines() if line.strip()]
    return [row["text"] for row in rows], [DEMO_SCENES / row["file_name"] for row in rows]


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (32, 32), (64, 48), (50, 40)]
    return [Image.fromarray((rng.random((*sizes[i % 4], 3)) * 255).astype("uint8")) for i in range(n)]


def good_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for (name, _), image in zip(GOOD, make_images(2)):
        image.save(folder / name)


def jsonl_folder(root: Path, bad_line: str | bytes) -> Path:
    """Two good records, then ``bad_line`` (line 3) in images/metadata.jsonl."""
    folder = root / "images"
    good_images(folder)
    good = "".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in GOOD).encode()
    (folder / "metadata.jsonl").write_bytes(good + (bad_line.encode() if isinstance(bad_line, str) else bad_line) + b"\n")
    return folder


def write_demo_folder(root: Path, n_scenes: int) -> Path:
    """The first demo scenes and their captions in an image folder, for runs with the trained demo model."""
    images = root / "images"
    images.mkdir(parents=True)
    captions, paths = demo_pairs()
    lines = []
    for caption, path in list(zip(captions, paths))[:n_scenes]:
        (images / path.name).write_bytes(path.read_bytes())
        lines.append(json.dumps({"file_name": path.name, "text": caption}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return images


def gradient(width: int, height: int) -> Image.Image:
    """Red encodes x and green y, linearly across the image: a pixel's colour says where it came from."""
    x = (np.arange(width) + 0.5) / width
    y = (np.arange(height) + 0.5) / height
    red, green = np.meshgrid(x * 255, y * 255)
    return Image.fromarray(np.stack([red, green, np.zeros_like(red)], -1).round().astype(np.uint8))


# --- configs ------------------------------------------------------------------------------------------------------
def write_config(root: Path, model: str, data: dict | None = None, **sections: dict) -> Path:
    """``root/run.yaml``: a quick float32 run (2 steps, no tolerance) of images/metadata.jsonl into ``root/run``."""
    config = {
        "model": {"name": model, "device": "cpu"},
        "attribution": {"n_steps": 2, "tolerance": None},
        "data": data or {"format": "imagefolder", "root": "images", "metadata": "images/metadata.jsonl"},
        "output": {"directory": "run"},
        "runtime": {"batch_size": 4},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_pipeline_config(path: Path, model_dir: str, **sections: dict) -> Path:
    """A float64 config at ``path`` (6 steps, given pairs, batches of 2) of images/metadata.jsonl into ``run``."""
    config = {
        "model": {"name": model_dir, "device": "cpu", "dtype": "float64"},
        "attribution": {"n_steps": 6},
        "data": {"format": "imagefolder", "root": "images", "metadata": "images/metadata.jsonl"},
        "pairing": {"mode": "given"},
        "output": {"directory": "run"},
        "runtime": {"batch_size": 2},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- the command line ---------------------------------------------------------------------------------------------
def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    output = result.output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, output


def json_line(output: str) -> dict:
    """A command's --json line among its warnings (the test runner mixes stderr into the output)."""
    return json.loads(next(line for line in output.splitlines() if line.startswith("{")))


def expect(args: list, code: int, message: str) -> str:
    exit_code, output = invoke(*args)
    flat = " ".join(output.split())  # Rich and typer wrap long lines
    assert exit_code == code, output
    assert re.search(message, flat), f"{message!r} not in {output!r}"
    return output


# --- run files ----------------------------------------------------------------------------------------------------
def plant_pair_number(f, pair: int, name: str, value: float) -> None:
    """Replace one of a stored pair's numbers in an open run file, with the checksum readers verify."""
    from xclip.store.layout import checksum, checksummed

    pairs = f["pairs"]
    pairs[name][pair] = value
    pairs["checksum"][pair] = checksum(pairs[column][pair] for column in checksummed(f, "pairs"))


def plant_map(f, pair: int, interactions: np.ndarray) -> None:
    """Replace a stored pair map in an open run file, with the checksum that readers verify (a plant without it
    is refused as damage)."""
    from xclip.store.layout import checksum, checksummed

    pairs = f["pairs"]
    pairs["interactions"][pair] = interactions
    pairs["checksum"][pair] = checksum(pairs[column][pair] for column in checksummed(f, "pairs"))


def synthetic_run(tmp_path: Path, model_dirs: dict[str, str]) -> tuple[Path, list[dict]]:
    """Six 32 x 32 synthetic scenes attributed by the random CLIP: the run file and the scenes' annotations."""
    assert runner.invoke(app, ["synth", str(tmp_path / "scenes"), "--n", "6", "--seed", "3", "--size", "32"]).exit_code == 0
    config = {
        "model": {"name": model_dirs["clip"], "device": "cpu"},
        "attribution": {"n_steps": 2},
        "data": {"format": "imagefolder", "root": "scenes", "metadata": "scenes/metadata.jsonl"},
        "output": {"directory": "run"},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert runner.invoke(app, ["attribute", str(tmp_path / "run.yaml"), "-q"]).exit_code == 0
    return tmp_path / "run" / "run.h5", read_annotations(tmp_path / "scenes" / "annotations.jsonl")


def plant_phrase_maps(run_file: Path, annotations: list[dict], model_dirs: dict[str, str], *, correct: bool) -> None:
    """Replace each pair's map of a ``synthetic_run``: every phrase's tokens meet the patches of its boxes with 1.0
    (``correct``) or the patches outside them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["clip"])
    geometry = Preprocessing((32, 32), (0.0, 0.0, 32.0, 32.0), (32, 32), (4, 4))
    with h5py.File(run_file, "r+") as f:
        for index, record in enumerate(annotations):
            planted = np.nan_to_num(f["pairs/interactions"][index]) * 0.0
            offsets = tokenizer(record["caption"], return_offsets_mapping=True)["offset_mapping"]
            for phrase in record["phrases"]:
                rows = [r for r, (a, b) in enumerate(offsets) if b > a and a < phrase["end"] and b > phrase["start"]]
                mask = box_weights(phrase["boxes"], geometry) > 0
                for row in rows:
                    planted[row, 1:] = np.where(mask if correct else ~mask, 1.0, 0.0) + planted[row, 1:]
            plant_map(f, index, planted)


# --- what a model reads -------------------------------------------------------------------------------------------
SPECIAL = {"<|startoftext|>", "<|endoftext|>", "<s>", "</s>"}


def caption_tokens(tokens: list[str], words: dict[str, str] | None = None) -> CaptionTokens:
    """A caption of the given tokens, a word each (``words`` names what an unknown token stood for)."""
    words = words or {}
    caption, offsets = "", []
    for token in tokens:
        if token in SPECIAL:
            offsets.append((0, 0))
            continue
        text = words.get(token, token.removesuffix("</w>"))
        start = len(caption) + (1 if caption else 0)
        caption = f"{caption} {text}" if caption else text
        offsets.append((start, len(caption)))
    return CaptionTokens(caption, tokens, offsets, [t in SPECIAL for t in tokens], [t == "<unk>" for t in tokens])


def assert_read_as_text(adapter: xclip.DualEncoderAdapter, caption: str) -> None:
    """``caption`` is tokenised as its characters: its tokens spell it, with exactly one BOS (where the family has
    one) before them and one EOS after them; no special flag and no BOS/EOS id among them; not truncated."""
    batch = adapter.tokenize([caption, "a dog"])  # in a batch, so that padding follows the shorter caption
    tokens, ids = batch.tokens[0], batch.input_ids[0, : batch.n_positions[0]].tolist()
    text = [row for row, is_special in enumerate(tokens.special) if not is_special]
    first = 0 if adapter.bos_token_id is None else 1
    assert text == list(range(first, first + len(text))), tokens.tokens
    assert "".join(tokens.text_of(row) for row in text) == caption.replace(" ", ""), tokens.tokens
    assert {adapter.bos_token_id, adapter.eos_token_id}.isdisjoint(ids[row] for row in text), tokens.tokens
    assert ids[first + len(text)] == adapter.eos_token_id and all(tokens.special[first + len(text) :])
    if adapter.bos_token_id is not None:  # causal towers: BOS, the text, EOS, and nothing after it
        assert ids[0] == adapter.bos_token_id and len(ids) == len(text) + 2
    assert batch.is_truncated == [False, False]


def assert_patches_where_the_processor_put_them(model: xclip.DualEncoderAdapter, size: tuple[int, int]) -> None:
    """Each patch's mean colour in the model's input is the colour at its rectangle's centre in the original."""
    processed = model.preprocess_image(gradient(*size))
    geometry = processed.geometry
    mean, std = np.array(model.image_mean)[:, None, None], np.array(model.image_std)[:, None, None]
    pixels = (processed.pixels.double().numpy() * std + mean) * 255  # (3, H, W) as 0..255 again
    rows, cols = geometry.grid
    height, width = pixels.shape[1:]
    assert (width, height) == geometry.input_size
    patch_h, patch_w = height // rows, width // cols
    mean_colour = np.array(model.image_mean) * 255
    for index, (x0, y0, x1, y1) in enumerate(geometry.patch_rects()):
        r, c = divmod(index, cols)
        patch = pixels[:, r * patch_h : (r + 1) * patch_h, c * patch_w : (c + 1) * patch_w].mean(axis=(1, 2))
        if x1 <= 0 or y1 <= 0 or x0 >= size[0] or y0 >= size[1]:  # wholly in the padding: the mean colour
            assert patch == pytest.approx(mean_colour, abs=1.5), (size, index, patch)
            continue
        if x0 < 0 or y0 < 0 or x1 > size[0] or y1 > size[1]:  # part image, part padding
            continue
        centre = ((x0 + x1) / 2 / size[0] * 255, (y0 + y1) / 2 / size[1] * 255)
        # within 3 original pixels (resampling blurs edges); a crop misplaced by one input pixel is further off
        assert abs(patch[0] - centre[0]) <= 3 * 255 / size[0] + 1, (size, index, patch[:2], centre)
        assert abs(patch[1] - centre[1]) <= 3 * 255 / size[1] + 1, (size, index, patch[:2], centre)


# --- the viewer's server ------------------------------------------------------------------------------------------
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


def ask(port: int, path: str, host: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` with the ``Host`` header a browser would send for ``host`` (default: the server's own)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"Host": host} if host else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def page_url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


# --- a real browser (the ``driver`` fixture is in conftest.py) ----------------------------------------------------
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser(test):
    """Marks a test that drives Chromium: in the slow tier (a browser starts per test), and skipped without a
    browser, except where XCLIP_REQUIRE_BROWSER is set (CI): there a missing browser fails it."""
    needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("XCLIP_REQUIRE_BROWSER"),
                                       reason="needs Debian's chromium and chromium-driver")
    return pytest.mark.slow(needs_browser(test))


WAIT_S = 600.0  # the most one state of the page may take: generous, CI machines are slow and shared


def wait_for(condition, timeout: float = WAIT_S):
    """``condition()``'s first true value, asked until the deadline; an element the page replaced while it was
    asked about counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("the page did not get there in time")


def settled(driver) -> bool:
    """The page's own readiness signals: its first answers are drawn (``data-ready``), and every request it sent
    since has been answered and applied, or dropped as stale (``data-busy`` 0)."""
    return driver.execute_script("return document.body.dataset.ready === 'true' && document.body.dataset.busy === '0'")


def wait_settled(driver, condition=lambda: True):
    """Wait until the page has settled in a state where ``condition()`` holds (its first true value)."""
    return wait_for(lambda: settled(driver) and condition())


def attribute(driver, element_id: str, name: str) -> str | None:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).get_attribute(name)


# --- the documentation: README.md and the pages under docs/ -------------------------------------------------------
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.M | re.S)


def doc_pages() -> list[str]:
    """README.md and every page under docs/, as paths relative to the repository root."""
    return ["README.md", *sorted(f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md"))]


def doc_sections(path: str) -> list[tuple[str, str]]:
    """``(title, text)`` of every section of a page (relative to the repository root): a heading of any level and
    the text up to the next heading (``#`` lines inside fenced code blocks are not headings); the text before the
    first heading has the title ''."""
    sections, title, lines, fenced = [], "", [], False
    for line in (ROOT / path).read_text().splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6} (.+)", line)
        if heading:
            sections.append((title, "".join(lines)))
            title, lines = heading.group(1).strip(), []
        lines.append(line)
    sections.append((title, "".join(lines)))
    return sections


def section(path: str, title: str) -> str:
    """The text of a page's section: its heading (``title`` as written after the ``#``s) up to the next heading."""
    found = [text for name, text in doc_sections(path) if name == title]
    assert len(found) == 1, f"{path} has {len(found)} headings {title!r}"
    return found[0]


def code_blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in ``text`` ('' for blocks that name none)."""
    return [body for name, body in FENCE.findall(text) if name == language]


def shows_xclip_command(block: str) -> bool:
    """A code block with an ``xclip ...`` command line in it (also as a ``$ xclip ...`` shell transcript)."""
    return any(re.match(r"(\$ )?xclip( |$)", line.strip()) for line in block.splitlines())


def serve_briefly(arguments: list[str], cwd: Path) -> str:
    """Run an ``xclip view`` command line on a free port, fetch its first page, stop it; the page's HTML."""
    import subprocess
    import sys
    import urllib.request

    xclip_command = Path(sys.executable).parent / "xclip"
    process = subprocess.Popen([str(xclip_command), *arguments, "--port", "0"], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), (url, process.stderr.read() if process.poll() is not None else "")
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.read().decode()
    finally:
        process.terminate()
        process.wait(timeout=30)
