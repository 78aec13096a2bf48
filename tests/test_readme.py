"""The README's Python blocks run as pasted: in order, in one fresh interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_python_blocks_are_found():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a\n```\n"
    blocks = python_blocks(text)
    assert blocks == ["a = 1\n", "b = a\n"]


def test_readme_python_blocks_run_in_order_in_a_fresh_interpreter(tmp_path):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    for k, block in enumerate(blocks):
        compile(block, f"README block {k + 1}", "exec")  # each one whole on its own
    script = "".join(f"# --- README block {k + 1}\n{block}\n" for k, block in enumerate(blocks))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
