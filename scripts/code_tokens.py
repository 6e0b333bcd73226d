"""Count a tree's Python code tokens: comments, blank lines and indentation not counted.

    python scripts/code_tokens.py src/alexnet_jax

Formatting changes line counts, not this: it counts names, operators, literals
(a docstring is one token) as Python's tokenizer reads them.
"""

import io
import sys
import tokenize
from pathlib import Path

LAYOUT = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
}


def code_tokens(source: str) -> int:
    return sum(t.type not in LAYOUT for t in tokenize.generate_tokens(io.StringIO(source).readline))


def main(roots: list[str]) -> None:
    total = 0
    for root in roots:
        if not Path(root).exists():
            sys.exit(f"code_tokens.py: {root}: no such file or folder (give Python files or folders of them)")
        files = sorted(Path(root).rglob("*.py")) if Path(root).is_dir() else [Path(root)]
        if any(f.suffix != ".py" for f in files):
            sys.exit(f"code_tokens.py: {root}: not a Python file (give .py files or folders of them)")
        for f in files:
            n = code_tokens(f.read_text())
            total += n
            print(f"{n:8d}  {f}")
    print(f"{total:8d}  total")


if __name__ == "__main__":
    main(sys.argv[1:] or ["src"])
