"""Summary runs (output.contributions: none): a pair's map in a few numbers per token, stored instead of
contributions, read back as a run that stores contributions computes them, in at most 2 KiB a pair."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from faults import count_writes
from helpers import (
    DEMO_MODEL,
    attribute,
    browser,
    expect,
    invoke,
    jsonl_folder,
    page_url,
    section,
    serving,
    wait_settled,
    write_config,
    write_demo_folder,
)

from xclip.attribution.summary import TOKEN_ARRAYS, summarise_map, summarise_maps
from xclip.config import load_config
from xclip.run.runner import run
from xclip.store import schema
from xclip.store.reader import NeedsContributions, RunReader

FAULTS = Path(__file__).resolve().parent / "faults.py"


# --- the summary of one map ---------------------------------------------------------------------------------------
def reference_summary(interactions: np.ndarray, n: int, grid: tuple[int, int], n_prefix: int, top_cells: int,
                      top_patches: int) -> dict[str, list]:
    """The contract's definitions, one token at a time in plain Python."""
    rows, columns = grid
    out: dict[str, list] = {name: [] for name in TOKEN_ARRAYS}
    for t in range(n):
        row = [float(v) for v in interactions[t]]
        patches = row[n_prefix:]
        out["values"].append(sum(row))
        peak = max(range(len(patches)), key=lambda k: (patches[k], -k))  # the first of equal largest
        has_peak = any(v != 0 for v in patches)
        out["peak_patch"].append(peak if has_peak else -1)
        out["peak_value"].append(patches[peak] if has_peak else math.nan)
        mass = [max(v, 0.0) for v in patches]
        total = sum(mass)
        if total == 0:
            for name in ("top_share", "entropy", "spread"):
                out[name].append(math.nan)
            out["centroid"].append([math.nan, math.nan])
            continue
        out["top_share"].append(sum(sorted(mass, reverse=True)[:top_patches]) / total)
        shares = [m / total for m in mass]
        out["entropy"].append(-sum(p * math.log(p) for p in shares if p > 0) / math.log(len(shares)))
        centres = [((k // columns + 0.5) / rows, (k % columns + 0.5) / columns) for k in range(len(shares))]
        centroid = [sum(p * c[axis] for p, c in zip(shares, centres)) for axis in (0, 1)]
        out["centroid"].append(centroid)
        out["spread"].append(math.sqrt(sum(p * ((c[0] - centroid[0]) ** 2 + (c[1] - centroid[1]) ** 2)
                                           for p, c in zip(shares, centres))))
    cells = sorted(((float(interactions[t, s]), t * interactions.shape[1] + s)
                    for t in range(n) for s in range(interactions.shape[1])), key=lambda c: -c[0])[:top_cells]
    out["top_cells"] = [index for _, index in cells]
    out["top_cell_values"] = [value for value, _ in cells]
    return out


def assert_summary_is(summary, expected: dict[str, list]) -> None:
    for name in TOKEN_ARRAYS:
        np.testing.assert_allclose(getattr(summary.token, name), np.array(expected[name], dtype=np.float64),
                                   rtol=1e-10, atol=1e-12, err_msg=name)
    assert summary.top_cells.tolist() == expected["top_cells"]
    np.testing.assert_allclose(summary.top_cell_values, expected["top_cell_values"], rtol=1e-12)


@pytest.mark.parametrize(("grid", "n_prefix"), [((3, 4), 1), ((2, 2), 0), ((5, 5), 1)])
def test_a_summary_is_the_contracts_definitions_on_random_maps(grid, n_prefix):
    rng = np.random.default_rng(sum(grid) + n_prefix)
    for n, length in ((4, 6), (6, 6), (1, 3)):
        interactions = rng.normal(size=(length, n_prefix + grid[0] * grid[1]))
        summary = summarise_map(interactions, n, grid, n_prefix, top_cells=7, top_patches=3)
        assert_summary_is(summary, reference_summary(interactions, n, grid, n_prefix, 7, 3))


def test_planted_rows_give_their_known_facts():
    grid, n_prefix = (3, 4), 1
    interactions = np.zeros((5, 13))
    interactions[0, n_prefix + 6] = 2.0  # all its mass on patch 6: row 1, column 2
    interactions[0, 0] = -0.5  # the CLS column counts in the value, never in the patches' facts
    interactions[1, n_prefix:] = 0.25  # spread evenly
    interactions[2, n_prefix:] = -1.0
    interactions[2, n_prefix + 3] = -0.1  # no positive mass; its largest patch is still named
    interactions[3, 0] = 1.0  # mass on CLS only
    interactions[4] = 99.0  # past n_positions: ignored
    summary = summarise_map(interactions, 4, grid, n_prefix, top_cells=3, top_patches=5)
    token = summary.token
    np.testing.assert_allclose(token.values, [1.5, 3.0, -11.1, 1.0])
    assert token.peak_patch.tolist() == [6, 0, 3, -1]  # a row that is 0 on every patch has no peak
    assert math.isnan(token.peak_value[3])
    assert (token.entropy[0], token.top_share[0], token.spread[0]) == (0.0, 1.0, 0.0)
    assert token.centroid[0].tolist() == [1.5 / 3, 2.5 / 4]
    assert token.entropy[1] == pytest.approx(1.0, abs=1e-15)
    assert token.top_share[1] == pytest.approx(5 / 12)
    np.testing.assert_allclose(token.centroid[1], [0.5, 0.5])
    centres = [((r + 0.5) / 3, (c + 0.5) / 4) for r in range(3) for c in range(4)]
    assert token.spread[1] == pytest.approx(math.sqrt(np.mean([(y - 0.5) ** 2 + (x - 0.5) ** 2 for y, x in centres])))
    for t in (2, 3):  # no positive mass on patches: NaN facts
        assert np.isnan([token.top_share[t], token.entropy[t], token.spread[t], *token.centroid[t]]).all()
    # the largest cells: patch 6 of row 0 (flat 0 * 13 + 7), then the CLS of row 3 (3 * 13), then row 1's patches
    assert summary.top_cells.tolist()[:2] == [7, 39]
    assert summary.top_cell_values.tolist() == [2.0, 1.0, 0.25]


def test_a_batch_of_maps_summarises_each_as_alone():
    rng = np.random.default_rng(3)
    grid, n_prefix, length = (4, 4), 1, 9
    lengths = [9, 3, 5, 1, 7]
    maps = torch.from_numpy(rng.normal(size=(len(lengths), length, 17)))
    batch = summarise_maps(maps, lengths, grid, n_prefix, top_cells=40, top_patches=4)
    for k, n in enumerate(lengths):
        alone = summarise_map(maps[k, :n], n, grid, n_prefix, top_cells=40, top_patches=4)
        together = batch.pair(k)
        for name in TOKEN_ARRAYS:
            np.testing.assert_array_equal(getattr(together.token, name), getattr(alone.token, name), err_msg=name)
        np.testing.assert_array_equal(together.top_cells, alone.top_cells)  # a 1-token map has 17 cells, not 40
        np.testing.assert_array_equal(together.top_cell_values, alone.top_cell_values)


# --- summary runs -------------------------------------------------------------------------------------------------
def _demo_project(root: Path, **output) -> Path:
    write_demo_folder(root, 3)
    return write_config(root, str(DEMO_MODEL), pairing={"mode": "all"}, output={"directory": "run", **output})


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """One demo project run twice, in float32: storing contributions and maps, and keeping summaries only."""
    root = tmp_path_factory.mktemp("summary")
    full = run(load_config(_demo_project(root / "full", pair_maps="store")))
    stages = []
    summary = run(load_config(_demo_project(root / "summary", contributions="none")),
                  on_progress=lambda stage, done, total: stages.append((stage, done, total)))
    assert full.n_done == summary.n_done == 9
    return root / "full" / "run", root / "summary" / "run", stages


def test_a_summary_run_keeps_the_numbers_and_summaries_of_a_full_run(demo_runs):
    full_dir, summary_dir, stages = demo_runs
    assert {stage for stage, _, _ in stages} == {"pairs"} and stages[-1][1:] == (9, 9)
    with RunReader(full_dir) as full, RunReader(summary_dir) as kept:
        assert full.stores_contributions and not kept.stores_contributions
        for name in (*schema.PAIR_NUMBERS, schema.TERMS):
            np.testing.assert_array_equal(kept.column("pairs", name), full.column("pairs", name), err_msg=name)
        for group in ("captions", "images"):
            for name in (*schema.INPUT_NUMBERS, schema.N_NODES, schema.IS_CONVERGED):
                np.testing.assert_array_equal(kept.column(group, name), full.column(group, name), err_msg=name)
        for caption in range(3):
            assert kept.caption_tokens(caption) == full.caption_tokens(caption)  # token strings through the vocabulary
        for pair in range(9):
            stored, computed = kept.pair_summary(pair), full.pair_summary(pair)
            for name in TOKEN_ARRAYS:
                np.testing.assert_array_equal(getattr(stored.token, name), getattr(computed.token, name), err_msg=name)
            np.testing.assert_array_equal(stored.top_cells, computed.top_cells)
            np.testing.assert_array_equal(stored.top_cell_values, computed.top_cell_values)
            # and the full run's summary is its map's, as summarise_map gives it (to float16 for the bounded facts)
            exact = summarise_map(full.interactions(pair), len(full.caption_tokens(full.pair_inputs(pair)[0])), full.grid,
                                  full.n_prefix, top_cells=16, top_patches=5)
            np.testing.assert_allclose(computed.token.entropy, exact.token.entropy, atol=1e-3)
            np.testing.assert_array_equal(computed.token.values, exact.token.values.astype(np.float32))
            assert computed.top_cells.tolist() == exact.top_cells.tolist()


def test_a_summary_run_file_holds_what_the_docs_say(demo_runs):
    _, summary_dir, _ = demo_runs
    table = section("docs/run-file.md", "Summary runs (`output.contributions: none`)")
    rows = re.findall(r"^\| `([\w/]+)` \| `\(([^)]*)\)` \| ([\w()]+) \|", table, flags=re.M)
    sizes = {"C": 3, "I": 3, "P": 9, "L": 32, "K": 16, "V": 37, "2": 2}
    dtypes = {"float16": "f2", "float32": "f4", "int16": "i2", "int32": "i4", "str": "O"}
    with h5py.File(summary_dir / "run.h5", "r") as f:
        for name, shape, dtype in rows:
            assert f[name].shape == tuple(sizes[s.strip()] for s in shape.split(",") if s.strip()), name
            fixed = re.fullmatch(r"str\((\d+)\)", dtype)
            assert f[name].dtype == (h5py.string_dtype("utf-8", int(fixed.group(1))) if fixed else np.dtype(dtypes[dtype])), name
        held = set()
        f.visititems(lambda name, obj: held.add(name) if isinstance(obj, h5py.Dataset) else None)
    declared = {column.name if group == schema.ROOT else f"{group}/{column.name}"
                for group in (*schema.GROUPS, schema.ROOT) for column in schema.columns_of(group, schema.RunKind(stores_contributions=False))}
    assert held == declared
    documented = {name for name, _, _ in rows}
    summary_only = {f"pairs/{name}" for name in schema.SUMMARY_FIELDS} | {schema.VOCABULARY}
    narrower = {"captions/offsets", "captions/error", "images/error", "images/notes"}
    assert documented == summary_only | narrower
    for gone in ("captions/contributions", "captions/embedding", "captions/reference_embedding", "captions/tokens",
                 "images/contributions", "images/embedding", "images/reference_embedding", "pairs/interactions"):
        assert f"`{gone}`" in table, gone  # named as what a summary run leaves out


def test_a_summary_run_of_the_demo_model_takes_at_most_2_kib_a_pair(tmp_path, demo_runs):
    from xclip.models.loading import load_model
    from xclip.store.create import create_run_file
    from xclip.store.schema import RunInputs, Sizes
    from xclip.store.space import declared_bytes

    # the store's count of a run's fixed-size columns is what HDF5 allocated in a real summary run
    _, summary_dir, _ = demo_runs
    with h5py.File(summary_dir / "run.h5", "r") as f:
        allocated = []
        f.visititems(lambda _, obj: allocated.append(obj.id.get_storage_size())
                     if isinstance(obj, h5py.Dataset) and obj.dtype.kind != "O" else None)
    inputs = RunInputs(["c"] * 3, ["i"] * 3, np.zeros((9, 2), dtype=np.int64), [])
    assert declared_bytes(inputs, Sizes(32, 65, 128, 16), "float32", schema.SUMMARY_RUN) == sum(allocated)
    # a 1:1 run of the demo model's shapes, its captions and paths as long as the demo's: the whole file per pair
    model = load_model(str(DEMO_MODEL), device="cpu")
    n = 2000
    create_run_file(
        tmp_path / "run.h5", attributes={"config": {}}, captions=[f"two objects: a purple cross and a blue star {k}" for k in range(n)],
        images=[f"scenes/scene{k:08d}.png" for k in range(n)], pairs=[(k, k) for k in range(n)], rejected_records=[],
        store_pair_maps=False, precision="float32", max_text_positions=model.max_text_positions,
        n_image_positions=1 + 64, embedding_dim=model.embedding_dim, grid=model.patch_grid, n_prefix=1,
        store_contributions=False, n_top_cells=16, vocabulary=model.vocabulary(),
    )
    assert (tmp_path / "run.h5").stat().st_size / n <= 2048


def test_what_needs_contributions_says_so_once_with_the_way_to_get_them(tmp_path, demo_runs):
    _, summary_dir, _ = demo_runs
    how = r"xclip attribute CONFIG output.contributions=store output.directory=OTHER data.limit=N"
    with RunReader(summary_dir) as kept:
        for read in (lambda: kept.pair(0), lambda: kept.interactions(0), lambda: kept.contributions("images", 0)):
            with pytest.raises(NeedsContributions, match=re.escape(how)):
                read()
    output = expect(["render", summary_dir], 2, r"drawing figures \(xclip render\) needs stored contributions")
    assert how in output and output.count("needs stored contributions") == 1
    annotations = tmp_path / "phrases.jsonl"
    annotations.write_text(json.dumps({"caption": "x", "image": "y", "phrases": []}) + "\n")
    expect(["evaluate", summary_dir, "--annotations", annotations], 2, r"scoring phrases against their boxes .* needs stored contributions")
    code, output = invoke("inspect", summary_dir)
    assert code == 0 and "keeps each pair's numbers and summary only" in output
    described = json.loads(invoke("inspect", summary_dir, "--json")[1])
    assert described["stores_contributions"] is False and described["counts"]["pairs"]["done"] == 9


@pytest.mark.parametrize(("keys", "named"), [
    (["output.pair_maps=store"], "output.pair_maps store needs output.contributions store"),
    (["output.render=true"], "output.render needs output.contributions store"),
])
def test_a_summary_run_refuses_what_it_cannot_store(tmp_path, keys, named):
    config = _demo_project(tmp_path, contributions="none")
    expect(["attribute", config, *keys], 2, re.escape(named))
    assert not (tmp_path / "run").exists()


def test_the_viewer_shows_a_summary_pairs_numbers_and_tokens(demo_runs):
    from xclip.show.viewer import RunData

    _, summary_dir, _ = demo_runs
    data = RunData(summary_dir)
    page = data.pair(4)
    with RunReader(summary_dir) as kept:
        summary, tokens = kept.pair_summary(4), kept.caption_tokens(kept.pair_inputs(4)[0])
        assert page["score"] == pytest.approx(float(kept.value("pairs", "score", 4)))
    assert page["interactions"] is None and "output.contributions=store" in page["summary_note"]
    assert [row["token"] for row in page["token_table"]] == tokens.tokens
    words = [t for t, row in enumerate(page["token_table"]) if row["value"]]
    assert words and all(page["token_table"][t]["value"] == pytest.approx(summary.token.values[t]) for t in words)
    shares = [row["score_share"] for row in page["token_table"]]
    assert sum(shares) == pytest.approx(1.0)  # each token's share of the score: its value over the map's total
    assert data.run_scale()["value"] is None and data.summary()["stores_contributions"] is False


@browser
def test_the_browser_shows_a_summary_pairs_tokens_and_why_it_has_no_map(demo_runs, driver):
    from selenium.webdriver.common.by import By

    _, summary_dir, _ = demo_runs
    with RunReader(summary_dir) as kept:
        tokens = kept.caption_tokens(kept.pair_inputs(2)[0]).tokens
    with serving(summary_dir) as server:
        driver.get(page_url(server) + "#pair=2")
        wait_settled(driver, lambda: attribute(driver, "pair", "data-index") == "2")
        assert driver.find_element(By.ID, "summary-only").is_displayed()
        assert not driver.find_element(By.ID, "views").is_displayed()  # no map to draw
        assert "output.contributions=store" in driver.find_element(By.ID, "summary-note").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#token-table tbody tr")
        assert [row.find_element(By.TAG_NAME, "td").text for row in rows] == tokens
        assert driver.find_element(By.ID, "score").text  # the pair's numbers are shown


def test_summary_shards_merge_into_the_one_process_run(tmp_path):
    from xclip.store.merge import merge_shards

    config = _demo_project(tmp_path, contributions="none")
    for shard in range(2):
        run(load_config(config, [f"runtime.shard_index={shard}", "runtime.num_shards=2"]))
    merged = merge_shards(tmp_path / "run")
    whole = run(load_config(config, ["output.directory=whole"]))
    assert whole.n_done == 9
    with RunReader(merged) as joined, RunReader(tmp_path / "whole") as one:
        assert not joined.stores_contributions
        texts = joined.captions()
        keys = [(texts[c], joined.image_paths()[i]) for c, i in zip(joined.column("pairs", "caption_index"), joined.column("pairs", "image_index"))]
        one_keys = [(one.captions()[c], one.image_paths()[i]) for c, i in zip(one.column("pairs", "caption_index"), one.column("pairs", "image_index"))]
        for p in range(9):
            q = one_keys.index(keys[p])
            # float32 runs: batches of other sizes round otherwise
            np.testing.assert_allclose(joined.pair_summary(p).token.values, one.pair_summary(q).token.values, atol=1e-6)
            assert float(joined.value("pairs", "score", p)) == pytest.approx(float(one.value("pairs", "score", q)), abs=1e-6)
        assert joined.n_items("pairs") == 9
        assert joined.caption_tokens(0).tokens == one.caption_tokens(one.captions().index(texts[0])).tokens


def test_an_evicted_caption_is_attributed_again_to_the_same_numbers(tmp_path, demo_runs, monkeypatch):
    import xclip.run.runner as runner

    _, summary_dir, _ = demo_runs
    monkeypatch.setattr(runner, "CAPTION_CACHE_BYTES", 1)  # keeps one caption: every other one is recomputed
    monkeypatch.setattr(runner, "SUMMARY_PAIR_CHUNK", 2)
    config = _demo_project(tmp_path, contributions="none")
    assert run(load_config(config)).n_done == 9
    with RunReader(tmp_path / "run") as again, RunReader(summary_dir) as kept:
        assert (again.status("pairs") == schema.DONE).all()
        # to float32 rounding: a caption attributed alone rounds otherwise than in a batch of three
        for name, tolerance in ((schema.SCORE, 1e-6), (schema.TOKEN_VALUES, 1e-6), (schema.ENTROPY, 2e-3)):
            np.testing.assert_allclose(again.column("pairs", name), kept.column("pairs", name), atol=tolerance, err_msg=name)


# --- crash safety of the fused stage ------------------------------------------------------------------------------
def _kill_project(root: Path, model_dirs) -> Path:
    jsonl_folder(root, '{"file_name": "img0.png", "text": "a cat"}')
    return write_config(root, model_dirs["clip"], pairing={"mode": "all"}, runtime={"batch_size": 1},
                        output={"directory": "run", "contributions": "none"})


def _datasets(run_file: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(run_file, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    out.pop("images/mtime_ns")  # each project writes its image files anew
    return out


@pytest.mark.slow  # crash injection: a killed subprocess per write
def test_a_summary_run_killed_inside_any_write_resumes_to_the_uninterrupted_result(tmp_path, model_dirs):
    reference = _kill_project(tmp_path / "reference", model_dirs)
    def attribute() -> None:
        assert invoke("attribute", reference, "-q")[0] == 0

    n_writes = count_writes(attribute)
    assert n_writes > 30
    points = sorted({1, 2, *np.linspace(3, n_writes - 2, 8).astype(int).tolist(), n_writes - 1, n_writes})
    expected = _datasets(reference.parent / "run" / "run.h5")
    for point in points:
        config = _kill_project(tmp_path / f"kill-{point}", model_dirs)
        killed = subprocess.run([sys.executable, str(FAULTS), str(point), "attribute", str(config), "-q"],
                                capture_output=True, timeout=300)
        assert killed.returncode == -9, f"write {point}: {killed.stderr.decode()[-2000:]}"
        with RunReader(config.parent / "run"):  # the killed file opens
            pass
        code, output = invoke("attribute", config, "-q", "--json")
        assert code == 0, f"rerun after a kill at write {point}: {output}"
        got = _datasets(config.parent / "run" / "run.h5")
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} after a kill at write {point}")
