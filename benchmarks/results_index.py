"""docs/results/README.md, the index of the result pages, generated from the pages themselves so that it
cannot drift from them: each page's title (its first heading) and the command that wrote it (the first
code span after "Command:", else the first that runs a benchmark script, else `fdiv-align-report` or `fdiv-align`).

    python benchmarks/results_index.py            # write docs/results/README.md
    python benchmarks/results_index.py --check    # exit 1 if the committed index differs (tests run this)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PAGES = Path(__file__).resolve().parents[1] / "docs" / "results"
#: the commands a page may name, in order of preference: its "Command:" line, a benchmark script, the CLI
COMMANDS = [re.compile(r"Command: `([^`]*)`"), re.compile(r"`((?:[A-Z_]+=\S+ )*(?:python|bash) benchmarks/[^`]*)`"),
            re.compile(r"`(fdiv-align[^`]*)`")]
INTRO = """# Results

Every page below was written by the command in its row (run from the repository root), names the machine
and the date, and is regenerated from the compact results its benchmark keeps in `benchmarks/results/`
(one JSONL file per benchmark: a finished cell per line, so a benchmark resumes where it stopped and
deleting a line re-runs only that cell). This index is generated: `python benchmarks/results_index.py`.
"""


def index() -> str:
    rows = ["| page | what | command |", "|---|---|---|"]
    for page in sorted(PAGES.glob("*.md")):
        if page.name == "README.md":
            continue
        text = page.read_text(encoding="utf-8")
        title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), page.stem)
        found = next((m for pattern in COMMANDS for m in [pattern.search(text)] if m), None)
        if found is None:
            raise SystemExit(f"{page}: names no command that wrote it (a `python benchmarks/...` code span)")
        rows.append(f"| [{page.name}]({page.name}) | {title} | `{' '.join(found.group(1).split())}` |")
    return INTRO + "\n" + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed index instead of writing it")
    args = ap.parse_args()
    wanted, path = index(), PAGES / "README.md"
    if args.check:
        if path.read_text(encoding="utf-8") != wanted:
            print(f"{path} is out of date: run python benchmarks/results_index.py", file=sys.stderr)
            sys.exit(1)
        return
    path.write_text(wanted, encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
