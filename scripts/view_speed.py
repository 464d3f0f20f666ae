"""How fast `xclip view` answers on a small run and on a large one: what opening the page and a pair costs.

    python scripts/view_speed.py [--small 4] [--large 400] [--out view_speed.json]

Builds `pairing.mode: all` runs of N synthetic scenes on the demo model (N x distinct captions pairs): a small
one, and a large one of more than 100,000 pairs with and without stored maps (without, the pair's map is
computed from the stored contributions at the request), then times the requests the page makes
through the viewer's own server on 127.0.0.1: the run summary, the first table page sorted by score, the
failures, one pair's map and its image. Median of 5 rounds, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from xclip.config import load_config
from xclip.run.runner import run
from xclip.store.reader import RunReader
from xclip.analysis.synthetic import generate, write_scenes
from xclip.show.viewer import make_server

DEMO_MODEL = Path(__file__).resolve().parents[1] / "xclip" / "models" / "shapes-clip"
REQUESTS = {
    "summary": "api/run",
    "first_page_by_score": "api/pairs?sort=score&order=desc&limit=100",
    "failures": "api/failures",
    "pair_map": "api/pair/{pair}",
    "pair_image": "api/pair/{pair}/image.png",
}


def build(root: Path, n: int, pair_maps: str) -> Path:
    write_scenes(generate(n, seed=40000), root / "scenes")
    (root / "run.yaml").write_text(json.dumps({
        "model": {"name": str(DEMO_MODEL), "device": "cpu"},
        "data": {"format": "imagefolder", "root": "scenes", "metadata": "scenes/metadata.jsonl"},
        "pairing": {"mode": "all"},
        "output": {"directory": "run", "pair_maps": pair_maps},
        "runtime": {"batch_size": 64},
    }))
    run(load_config(root / "run.yaml"))
    return root / "run"


def timings(run_dir: Path) -> dict[str, float]:
    server = make_server(run_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with urllib.request.urlopen(base + "api/pairs?sort=score&order=desc&limit=1") as response:
            pair = json.loads(response.read())["rows"][0]["index"]
        result = {}
        for name, path in REQUESTS.items():
            seconds = []
            for _ in range(5):
                start = time.perf_counter()
                with urllib.request.urlopen(base + path.format(pair=pair)) as response:
                    response.read()
                seconds.append(time.perf_counter() - start)
            result[f"{name}_ms"] = round(1000 * statistics.median(seconds), 1)
        return result
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=4, help="scenes of the small run")
    parser.add_argument("--large", type=int, default=400, help="scenes of the large run")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as folder:
        cases = (("small", args.small, "auto"), ("large", args.large, "store"), ("large_without_maps", args.large, "none"))
        for name, n, pair_maps in cases:
            run_dir = build(Path(folder) / name, n, pair_maps)
            with RunReader(run_dir) as stored:
                pairs, maps = len(stored.status("pairs")), stored.has_pair_maps
            report[name] = {"scenes": n, "pairs": pairs, "stored_maps": maps, **timings(run_dir)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
