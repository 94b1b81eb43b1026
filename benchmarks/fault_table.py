"""The fault table of ``benchmarks/RESULTS.md``: every CLI fault case, what it printed.

Runs ``tests/test_faults.py`` (real ``dereverb`` processes; each case asserts one ``error:``
line, exit status 2, and that the store and the user's files are byte-identical before and
after) and prints one markdown row per case from what the commands actually printed. A row
appears only for a case whose test passed, so "nothing lost" is what the test asserted.

    python benchmarks/fault_table.py > /tmp/faults.md
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _shorten(text: str) -> str:
    """Temporary paths as ``…/name`` so the table reads (and diffs) the same on every run."""
    text = re.sub(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+/", ".../", text)
    text = re.sub(r"pid \d+, started [0-9T:+-]+", "pid N, started T", text)
    return text.replace("|", "\\|")


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        record = Path(folder) / "faults.jsonl"
        env = {**os.environ, "DEREVERB_FAULT_RECORD": str(record)}
        junit = Path(folder) / "junit.xml"
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "tests/test_faults.py", f"--junitxml={junit}"],
            cwd=REPO,
            env=env,
            stdout=sys.stderr,  # pytest's progress stays out of the table
        )
        failed = set(
            re.findall(
                r'<testcase [^>]*name="([^"]+)"[^>]*>\s*<(?:failure|error)', junit.read_text()
            )
        )
        rows = [json.loads(line) for line in record.read_text().splitlines()]
    print("| case | command | message (stderr, one line) | exit | nothing lost |")
    print("|---|---|---|---|---|")
    for row in rows:
        case = row["case"].split("::")[-1]
        ok = "yes" if case not in failed else "**test failed**"
        command = _shorten(" ".join(row["command"]))
        print(f"| `{case}` | `{command}` | {_shorten(row['line'])} | {row['exit']} | {ok} |")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
