"""The README's Python example runs as written and prints what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# each test runs the README's example or commands in a fresh process, on the demo model
pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
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


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_the_quick_start_runs_as_pasted_in_a_fresh_shell(tmp_path):
    """The quick start's commands after `make demo` (which CI's `make test` stands in for: it makes .venv)."""
    (block,) = re.findall(r"```bash\n(.*?)```", section("Quick start"), flags=re.S)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands[:2] == ["make demo", "source .venv/bin/activate"]
    root = README.parent
    # a fresh shell: only the activation puts xclip on PATH (the venv this suite runs in stands for .venv)
    activate = f'export PATH="{Path(sys.executable).parent}:/usr/bin:/bin"'
    explain = commands[2].replace("runs/explained", str(tmp_path / "explained"))
    result = subprocess.run(["bash", "-c", f"cd {root} && {activate} && {explain}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "explained" / "heatmaps").iterdir()) == ["pair000000.png", "pair000001.png"]


def test_the_own_data_section_is_a_complete_run(tmp_path):
    """The section's folder, captions file and config, with the demo model and two demo scenes as the photos."""
    import json
    import shutil

    import yaml

    text = section("Your own images")
    (records,) = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    (config_text,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    (commands,) = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    project = tmp_path / "my-project"
    (project / "images").mkdir(parents=True)
    (project / "images" / "metadata.jsonl").write_text(records)
    scenes = README.parent / "configs" / "demo" / "scenes"
    for line, scene in zip(records.splitlines(), ("scene00000.png", "scene00001.png")):
        shutil.copyfile(scenes / scene, project / "images" / json.loads(line)["file_name"])  # Pillow reads by content
    config = yaml.safe_load(config_text)
    assert sorted(config) == ["data", "model", "output"]  # the sections of the five keys the section calls required, no more
    config["model"]["name"] = "xclip:demo"  # offline: the hub model the section names needs the network
    (project / "run.yaml").write_text(yaml.safe_dump(config))
    xclip = Path(sys.executable).parent / "xclip"
    for line in commands.splitlines():
        command = line.split("#")[0].split()
        if command[1] == "view":
            continue  # serves until stopped; the viewer has its own tests
        result = subprocess.run([str(xclip), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    assert len(list((project / "runs" / "mine" / "heatmaps").glob("pair*.png"))) == 3  # 2 + 1 captions
