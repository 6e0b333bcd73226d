"""scripts/code_tokens.py, the size the issue reports: code tokens, comments and layout not counted."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from code_tokens import code_tokens  # noqa: E402

SOURCE = '''x = 1  # a comment


def f():
    """A docstring is one token."""
    return x
'''


def test_counts_code_tokens_by_hand():
    # x = 1 (3); def f ( ) : (5); the docstring (1); return x (2): 11, whatever the layout or comments.
    assert code_tokens(SOURCE) == 11
    relaid = SOURCE.replace("x = 1  # a comment\n\n\n", "x=1\n# another comment, on its own line\n")
    assert code_tokens(relaid) == 11


def test_a_missing_or_non_python_path_is_one_line(tmp_path):
    for bad, says in ((tmp_path / "nosuch", "no such file or folder"), (ROOT / "README.md", "not a Python file")):
        r = subprocess.run(
            [sys.executable, "scripts/code_tokens.py", str(bad)], cwd=ROOT, capture_output=True, text=True
        )
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
