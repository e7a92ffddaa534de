"""The tolerance policy of tests/conftest.py, enforced: no test compares a floating-point result
with an absolute tolerance tighter than 1e-9 unless it scales it (rtol, a product with a magnitude)
or compares against an exact zero. Such a check holds on one CPU's summation order and fails on
another's (AVX2 vs AVX-512)."""

import re
from pathlib import Path

TIGHT = re.compile(r"(<=?\s*|atol\s*=\s*|abs\s*=\s*)1e-(9|[1-9][0-9])\b")
SCALED = re.compile(r"rtol|\*|scale|relative|exact zero|conftest\.py")


def test_no_unscaled_tight_absolute_tolerance():
    offenders = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name in ("test_tolerance_policy.py", "conftest.py"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if TIGHT.search(line) and not SCALED.search(line) and "assert" in line:
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "absolute tolerances that depend on the CPU's rounding:\n" + "\n".join(offenders)
