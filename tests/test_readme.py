"""The README's Python examples run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code):
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert any(k in namespace for k in ("o", "y"))


def test_readme_has_examples():
    assert len(BLOCKS) >= 2
