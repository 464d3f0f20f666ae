"""The shape of the code: no import cycles, tokenizers and image processors only inside adapters, readers of
one pair that read that pair's rows only, and test modules that import no other test module."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from xclip.show.pairs import load_pair_view
from xclip.store.reader import RunReader
from xclip.show.viewer import RunData

PACKAGE = Path(__file__).resolve().parents[1] / "xclip"
# what a tokenizer or an image processor offers; outside the adapters in xclip/models/ no module may use it
TOKENIZER_AND_PROCESSOR = {
    "tokenizer", "image_processor", "processor", "convert_ids_to_tokens", "all_special_ids", "all_special_tokens",
    "get_tokenizer", "AutoTokenizer", "AutoProcessor", "CLIPTokenizer", "CLIPProcessor", "CLIPImageProcessor",
    "SiglipProcessor", "PreTrainedTokenizerFast", "return_offsets_mapping", "offset_mapping",
}
# the adapters: one module per model family (and their shared base) in xclip/models/
ADAPTERS = {"base.py", "hf.py", "clip.py", "siglip.py", "openclip.py", "families.py"}
# writes random checkpoints (a tokenizer and processor included) for tests and benchmarks; never reads one
WRITES_CHECKPOINTS = {"random_models.py"}
# the floors, lowest first: a module imports from its own floor and the floors below it, never from one above;
# a floor is a folder of xclip/ or one of the few modules left at its top
FLOORS = ["errors", "threads", "disk", "core", "models", "config", "attribution", "store", "show", "analysis", "run",
          "cli", "__init__", "__main__"]
MOST_TOP_LEVEL_MODULES = 8


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# the one import that runs up, declared: a result draws itself (InteractionMap.plot) with the figures' code, which
# reads run files; it is imported inside .plot() only, so importing a result never loads the figures
UPWARD_IMPORTS = {("xclip.attribution.result", "xclip.show.figures")}


def imports(path: Path, modules: set[str]) -> set[str]:
    """The xclip modules a module imports anywhere: at import time, inside functions and under TYPE_CHECKING
    (``from xclip import schema`` imports the module xclip.store.schema)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path, set(paths)) if m != name and (name, m) not in UPWARD_IMPORTS}
            for name, path in paths.items()}


def test_imports_run_one_way_including_those_inside_functions():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(target):], target]))
            if target not in state:
                visit(target, [*trail, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert "xclip.store.writer" in graph["xclip.run.runner"]  # the graph is read: the runner writes through the store
    assert "xclip.attribution.engine" in graph["xclip.attribution.from_config"] and "xclip.core.interaction" in graph["xclip.store.reader"]  # and in functions


def floor(module: str) -> str:
    parts = module.split(".")
    return "__init__" if parts == ["xclip"] else parts[1]


def test_every_import_runs_down_the_floors():
    """Folders, not only modules, import one way: math below models below attribution below the run file below
    figures, analysis and runs, the command line on top."""
    rank = {name: i for i, name in enumerate(FLOORS)}
    upward = [f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
              if rank[floor(target)] > rank[floor(module)]]
    assert not upward, upward
    assert {floor(module) for module in import_graph()} == set(FLOORS)  # every module sits on a declared floor


def test_few_modules_left_at_the_top():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= MOST_TOP_LEVEL_MODULES, top
    assert all(path.is_dir() for path in PACKAGE.iterdir() if path.stem in FLOORS and path.suffix != ".py")


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    # the cycle store -> attribution -> result -> render -> store ran through an import inside a function: the
    # checker must see such imports
    module = tmp_path / "lower.py"
    module.write_text("def f():\n    from xclip.store import reader\n    from xclip.attribution.engine import interaction_map\n")
    assert imports(module, {"xclip.store.reader", "xclip.attribution.engine"}) == {"xclip.store.reader", "xclip.attribution.engine"}


def test_no_module_outside_the_adapters_uses_a_tokenizer_or_an_image_processor():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "models" and path.name in ADAPTERS | WRITES_CHECKPOINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else \
                node.name if isinstance(node, ast.alias) else node.arg if isinstance(node, ast.keyword) else None
            if name in TOKENIZER_AND_PROCESSOR:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {name}")
    assert not found, found


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers.py and shared fixtures in tests/conftest.py: no test module is another's
    library."""
    found = []
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            found += [f"{path.name}:{node.lineno}: {name}" for name in names if name.split(".")[0].startswith("test_")]
    assert not found, found


def test_readers_of_one_pair_read_its_rows_only(demo_run, monkeypatch):
    with RunReader(demo_run) as run:
        c, i = run.pair_inputs(7)
        expected = (run.captions()[c], run.image_paths()[i], run.interactions(7))

    def whole_column(*args, **kwargs):
        raise AssertionError("read a whole column to answer for one pair")

    for name in ("captions", "image_paths", "column", "status"):  # what reads every caption, path or pair
        monkeypatch.setattr(RunReader, name, whole_column)
    answer = RunData(demo_run).pair(7)
    assert (answer["caption"], answer["image"]) == expected[:2]
    assert np.array_equal(np.array(answer["interactions"]), expected[2].astype(np.float64))
    RunData(demo_run).image(7)
    with RunReader(demo_run) as run:
        view = load_pair_view(run, 7, run.data_root())
        pair = run.pair(7)
    assert view.caption == expected[0] and np.array_equal(view.interactions, expected[2])
    assert (pair.caption, pair.image_index) == (expected[0], i) and pair.image.endswith(expected[1])
    assert np.array_equal(pair.interactions.numpy(), expected[2])


def test_errors_name_the_setting_as_the_user_gave_it(tmp_path, model_dirs):
    from helpers import expect, jsonl_folder, write_config
    from PIL import Image

    import xclip
    from xclip.run.runner import run
    from xclip.config import load_config

    missing = tmp_path / "missing.pt"
    with pytest.raises(xclip.ConfigError, match=r"^checkpoint: no file at") as raised:  # the API's own name
        xclip.load_model("open_clip:ViT-B-32", checkpoint=missing, device="cpu")
    assert raised.value.setting == "checkpoint"
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    expect(["explain", tmp_path / "x.png", "a cat", "--model", "open_clip:ViT-B-32", "--checkpoint", missing], 2,
           r"Error: --checkpoint: no file at")
    jsonl_folder(tmp_path, '{"file_name": "img0.png", "text": "a cat"}')
    config = write_config(tmp_path, "open_clip:ViT-B-32")
    config.write_text(config.read_text().replace("name: open_clip:ViT-B-32", f"name: open_clip:ViT-B-32\n  checkpoint: {missing}"))
    expect(["attribute", config], 2, r"Error: model.checkpoint: no file at")
    # a run made with other settings: the API is told overwrite=True, the command line --overwrite
    finished = write_config(tmp_path, model_dirs["clip"])
    assert run(load_config(finished)).n_done == 3
    with pytest.raises(xclip.ConfigError, match=r"or pass overwrite=True to replace it"):
        run(load_config(finished, ["attribution.n_steps=3"]))
    expect(["attribute", finished, "attribution.n_steps=3"], 2, r"or pass --overwrite to replace it")
    expect(["attribute", finished, "attribution.n_steps=0"], 2, r"attribution.n_steps: n_steps must be a whole number from 1 to 1024, got 0")
