"""Screenshots of the viewer's pair page saying what the model read: a crop note, unknown-word chips and a
truncated caption, from a small run of the demo model on a wide image (three demo scenes side by side; the
model's centre crop sees the middle one); and the figure of the crop's pair, which docs/figures.md shows.

    python scripts/viewer_screenshots.py   # needs Debian's chromium and chromium-driver; writes docs/viewer-*.png
                                           # and docs/crop.png
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from xclip.run.explain import explain
from xclip.show.viewer import make_server

ROOT = Path(__file__).resolve().parents[1]
SCENES = ROOT / "configs" / "demo" / "scenes"
DOCS = ROOT / "docs"
# the demo model reads 32 tokens: this caption's last 8 words are past its context
TRUNCATED = "a red circle " * 10 + "and a green cross beside a yellow star"
CAPTIONS = {
    "viewer-crop-note.png": "a blue square, a red circle, a green cross and a yellow circle",
    "viewer-unknown-words.png": "a red zebra circle beside a giraffe",
    "viewer-truncation.png": TRUNCATED,
}


def wide_image(path: Path) -> Path:
    """Scenes 0, 1 and 2 side by side (192 x 64): the centre crop keeps scene 1, a third of the image."""
    wide = Image.new("RGB", (192, 64))
    for k in range(3):
        wide.paste(Image.open(SCENES / f"scene{k:05d}.png").convert("RGB"), (64 * k, 0))
    wide.save(path)
    return path


def browser(chromium: str, chromedriver: str):  # noqa: ANN201  (a selenium driver; selenium is optional)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1300", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(chromedriver))


def wait_for(condition, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            msg = "the page did not draw the pair in time"
            raise TimeoutError(msg)
        time.sleep(0.1)


def main() -> None:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        raise SystemExit("needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        explained = explain(wide_image(folder / "three-scenes.png"), list(CAPTIONS.values()), output=folder / "run", device="cpu")
        shutil.copyfile(explained.pairs[0].figure, DOCS / "crop.png")  # the crop outlined, the rest dimmed, the note
        print(DOCS / "crop.png")
        server = make_server(folder / "run", port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        driver = browser(chromium, chromedriver)
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/"
            for index, name in enumerate(CAPTIONS):
                driver.get(url + f"#pair={index}")
                wait_for(lambda: driver.execute_script(  # noqa: B023  (waited for before the next pair)
                    f"return document.getElementById('pair').dataset.index === '{index}' && document.body.dataset.busy === '0'"))
                driver.find_element(By.ID, "pair-pane").screenshot(str(DOCS / name))
                print(DOCS / name)
        finally:
            driver.quit()
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
