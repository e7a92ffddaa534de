"""Two runs' metrics.jsonl compared record by record, every logged value but the timings: how a change
that must not alter behaviour (a restructuring) is checked on the main job.

    python benchmarks/compare_runs.py RUN_DIR_A RUN_DIR_B

Prints the number of equal values and, per key that differs, how many records differ and the largest
|difference|; exit status 1 when the runs log different keys or numbers of records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TIMINGS = {"seconds", "seconds_sample", "seconds_score", "seconds_update", "samples_per_second"}


def records(run: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> int:
    a, b = records(sys.argv[1]), records(sys.argv[2])
    if len(a) != len(b):
        print(f"{len(a)} records against {len(b)}")
        return 1
    equal, differ = 0, {}
    for i, (x, y) in enumerate(zip(a, b)):
        if set(x) != set(y):
            print(f"record {i}: keys differ: {sorted(set(x) ^ set(y))}")
            return 1
        for key in sorted(set(x) - TIMINGS):
            if x[key] == y[key]:
                equal += 1
                continue
            gap = abs(x[key] - y[key]) if isinstance(x[key], (int, float)) and isinstance(y[key], (int, float)) else None
            differ.setdefault(key, []).append(gap)
    print(f"{len(a)} records; {equal} values equal (timings not compared)")
    for key, gaps in differ.items():
        sized = [g for g in gaps if g is not None]
        print(f"{key}: differs in {len(gaps)} records, max |difference| {max(sized) if sized else 'n/a'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
