"""The README's Python example runs as written and prints what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
    assert lines[4] == "16 True"
    assert lines[5] == "pair.pdf (930, 603)" and (tmp_path / "pair.pdf").read_bytes().startswith(b"%PDF-")
