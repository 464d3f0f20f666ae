"""The README and the pages under docs/: every command line and Python example in them runs as written and does
what its comments say, every relative link leads somewhere, and a page cannot show a command no test runs."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FENCE, ROOT, code_blocks, doc_pages, doc_sections, section, serve_briefly, shows_xclip_command

XCLIP = Path(sys.executable).parent / "xclip"  # the venv this suite runs in stands for .venv
SCENES = ROOT / "configs" / "demo" / "scenes"


def command_lines(block: str) -> list[list[str]]:
    """Each line of a shell block as arguments, its comment left off."""
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.split("#")[0].strip()]


def run_xclip(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert arguments[0] == "xclip", arguments
    result = subprocess.run([str(XCLIP), *arguments[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(arguments)}:\n{result.stderr}"
    return result


# --- every example is run --------------------------------------------------------------------------------------
@pytest.mark.slow  # a fresh process on a tiny random CLIP
def test_the_api_example_runs(tmp_path):
    (block,) = code_blocks(section("docs/api.md", "Example"), "python")
    script = tmp_path / "example.py"
    script.write_text(block)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "['<|startoftext|>', 'a</w>', 'red</w>', 'dog</w>', '<|endoftext|>']"
    assert lines[1] == "torch.Size([5, 4, 4])"
    error, value, bound = re.match(r"completeness error (\S+) of (\S+), bound (\S+)", lines[2]).groups()
    assert float(error) <= 1e-3 * abs(float(value)) and float(error) <= float(bound)
    assert lines[3] == "True"
    assert lines[4] == "12 True"
    assert lines[5] == "pair.pdf (755, 739)" and (tmp_path / "pair.pdf").read_bytes().startswith(b"%PDF-")
    assert lines[8] == "a blue cat 1 red.png 0"  # a map of attribute(..., pairs=) names what it pairs


@pytest.mark.slow  # a fresh shell running the demo model
def test_the_quick_start_runs_as_pasted_in_a_fresh_shell(tmp_path):
    """The quick start's commands after `make demo` (which CI's `make test` stands in for: it makes .venv)."""
    (block,) = code_blocks(section("README.md", "Quick start"), "bash")
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands[:2] == ["make demo", "source .venv/bin/activate"]
    # a fresh shell: only the activation puts xclip on PATH
    activate = f'export PATH="{XCLIP.parent}:/usr/bin:/bin"'
    explain = commands[2].replace("runs/explained", str(tmp_path / "explained"))
    result = subprocess.run(["bash", "-c", f"cd {ROOT} && {activate} && {explain}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "explained" / "heatmaps").iterdir()) == ["pair000000.png", "pair000001.png"]


@pytest.mark.slow  # subprocesses running the demo model
def test_the_own_images_section_is_a_complete_run(tmp_path):
    """The section's folder, captions file and config, with the demo model and two demo scenes as the photos."""
    import yaml

    text = section("README.md", "Your own images")
    (records,) = code_blocks(text, "json")
    (config_text,) = code_blocks(text, "yaml")
    (commands,) = code_blocks(text, "bash")
    project = tmp_path / "my-project"
    (project / "images").mkdir(parents=True)
    (project / "images" / "metadata.jsonl").write_text(records)
    for line, scene in zip(records.splitlines(), ("scene00000.png", "scene00001.png")):
        shutil.copyfile(SCENES / scene, project / "images" / json.loads(line)["file_name"])  # Pillow reads by content
    config = yaml.safe_load(config_text)
    assert sorted(config) == ["data", "model", "output"]  # the sections of the five keys the section calls required, no more
    config["model"]["name"] = "xclip:demo"  # offline: the hub model the section names needs the network
    (project / "run.yaml").write_text(yaml.safe_dump(config))
    for arguments in command_lines(commands):
        if arguments[1] == "view":
            assert "<html" in serve_briefly(arguments[1:], tmp_path).lower()
        else:
            run_xclip(arguments, tmp_path)
    assert len(list((project / "runs" / "mine" / "heatmaps").glob("pair*.png"))) == 3  # 2 + 1 captions


@pytest.mark.slow  # the demo's every command: two attributions and a calibration
def test_the_demo_command_by_command_runs(tmp_path, monkeypatch):
    """The command line page's tour, in a copy of the demo config (its runs land beside the copy) with a demo scene
    as `photo.jpg`; the viewer on a free port, and the calibration on 2 inputs of each tower rather than all 12 (77 s
    on two cores), into this test's own layout cache. The commands run in this process (the quick start runs the
    installed `xclip` in a fresh shell): a dozen fresh processes would spend half the test importing torch."""
    from typer.testing import CliRunner

    from xclip.cli.app import app

    def run_in_process(arguments: list[str]) -> str:
        assert arguments[0] == "xclip", arguments
        result = CliRunner().invoke(app, arguments[1:])
        assert result.exit_code == 0 and (result.exception is None or isinstance(result.exception, SystemExit)), \
            f"{shlex.join(arguments)}:\n{result.output}"
        return result.stdout

    make, commands = code_blocks(section("docs/cli.md", "The demo, command by command"), "bash")
    assert [arguments[0] for arguments in command_lines(make)] == ["make"] * 4  # CI's `make test` stands in for them
    shutil.copytree(ROOT / "configs" / "demo", tmp_path / "configs" / "demo")
    shutil.copyfile(ROOT / "configs" / "demo.yaml", tmp_path / "configs" / "demo.yaml")
    shutil.copyfile(SCENES / "scene00003.png", tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for arguments in command_lines(commands):
        if arguments[1] == "view":
            assert "<html" in serve_briefly(arguments[1:], tmp_path).lower()
        else:
            quicker = ["--inputs", "2"] if arguments[1] == "calibrate" else []
            outputs[shlex.join(arguments)] = run_in_process(arguments + quicker)
    runs = tmp_path / "runs"
    heatmaps = {p.name for p in (runs / "demo" / "heatmaps").iterdir()}
    assert {"pair000117_span-blue-star.png", "pair000117_box-39-16-61-38.png"} <= heatmaps
    assert len({name for name in heatmaps if re.fullmatch(r"pair\d{6}\.png", name)}) == 100  # the first 100 of 144
    assert sorted(p.name for p in (tmp_path / "xclip-explain-photo").glob("*.png")) == ["pair000000.png", "pair000001.png"]
    assert (runs / "demo" / "evaluation" / "report.json").is_file()
    assert (runs / "demo-blur" / "run.h5").is_file()
    assert (tmp_path / "xclip-compare" / "comparison.json").is_file()
    assert outputs["xclip --version"].startswith("xclip ")
    assert outputs["xclip calibrate configs/demo.yaml"].strip().endswith(".json")  # the layout file it wrote


@pytest.mark.slow  # a served run and an exported one
def test_the_viewer_commands_run(tmp_path, demo_run):
    (block,) = code_blocks(section("docs/viewer.md", "Browsing a run: `xclip view`"), "bash")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(demo_run)
    for arguments in command_lines(block):
        if "--export" in arguments:
            run_xclip(arguments, tmp_path)
        else:
            assert "<html" in serve_briefly(arguments[1:], tmp_path).lower()
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "data.js").is_file()


@pytest.mark.slow  # a calibration in a fresh process
def test_the_calibration_example_runs(tmp_path):
    """The example as written, after the model and the inputs it names; the layout lands in this test's own cache."""
    (block,) = code_blocks(section("docs/method.md", "Per-model panel layouts: `xclip calibrate`"), "python")
    given = (
        "from PIL import Image\n"
        "from xclip import InteractionAttribution, load_model\n"
        "from xclip.models.random_models import save_random_model\n"
        "model = load_model(save_random_model('tiny-clip', 'clip'), device='cpu')\n"
        "captions = ['a red dog', 'two blue circles', 'a cat']\n"
        "images = [Image.new('RGB', (64, 48), colour) for colour in ('red', 'blue', 'white')]\n"
    )
    check = (
        "layout = InteractionAttribution(model).panel_layout\n"
        "assert (layout.text, layout.image) == (calibration.text, calibration.image), layout\n"
        "print(layout.source)\n"
    )
    script = tmp_path / "calibrate.py"
    script.write_text(given + block + check)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(".json")  # read from the layout file the example saved


# --- and no page shows one that is not -------------------------------------------------------------------------
def sections_read_by_tests() -> set[tuple[str, str]]:
    """The ``(page, title)`` of every call ``section(PAGE, TITLE)`` with two string literals in a test module."""
    calls = set()
    for module in sorted((ROOT / "tests").glob("*.py")):
        calls |= set(re.findall(r"\bsection\(\s*\"([^\"]+)\",\s*\"([^\"]+)\"\s*\)", module.read_text()))
    return calls


def test_every_command_and_python_example_in_the_docs_is_run_by_a_test():
    """A fenced block with an `xclip ...` command line, or of Python, must lie in a section that a test reads; the
    tests above run every such block of the sections they read."""
    read = sections_read_by_tests()
    pages = set(doc_pages())
    for page, title in sorted(read):
        assert page in pages and title in [name for name, _ in doc_sections(page)], f"a test reads {page}: {title!r}, which is gone"
    unrun = []
    for page in doc_pages():
        for title, text in doc_sections(page):
            for language, block in FENCE.findall(text):
                if (language == "python" or shows_xclip_command(block)) and (page, title) not in read:
                    unrun.append(f"{page}, section {title!r}: {block.splitlines()[0]}")
    assert not unrun, "examples no test runs (run them in tests/test_docs.py, reading them with helpers.section):\n" + "\n".join(unrun)


def anchors(page: str) -> set[str]:
    """The anchors a git forge gives a page's headings (GitHub's rule: lower case, punctuation dropped, spaces to
    hyphens, repeats numbered)."""
    seen: dict[str, int] = {}
    found = set()
    for title, _ in doc_sections(page)[1:]:
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
    return found


def test_relative_links_lead_somewhere():
    broken = []
    for page in doc_pages():
        text = re.sub(r"^```.*?^```", "", (ROOT / page).read_text(), flags=re.M | re.S)
        text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute address
            path, _, anchor = target.partition("#")
            linked = (ROOT / page).parent / path if path else ROOT / page
            if not linked.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(str(linked.resolve().relative_to(ROOT))):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_stays_short():
    """The README is read through; everything else is a reference page under docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
