"""Hostile-input costs that tests used to assert as wall-clock limits (issue 26).

    python -m benchmarks.hostile_costs

The tests now bound these by counts (Python lines run, recursion depth, calls made) and
CPU-time ratios, which do not depend on the machine's speed or load; the absolute figures
live here, measured and printed, with the limits the tests once asserted beside them:

* 30,000-deep JSON profile refused (was < 1 s);
* ``check_names`` on 2,000 names 600 components deep (was < 3 s);
* ``llmarc list`` of those 2,000 deep names (was < 10 s) and of 20,000 entries (< 10 s);
* the slowest of 2,000 fuzz cases of tests/test_fuzz.py (was < 5 s per case).
"""

from __future__ import annotations

import contextlib
import io
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llmarc.cli import run as cli_run
from llmarc.container.json_safe import parse_profile_json
from llmarc.errors import CorruptArchiveError
from llmarc.safety import check_names
from tests.conftest import raw_archive


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def deep_json() -> None:
    with contextlib.suppress(CorruptArchiveError):
        parse_profile_json('{"a":' + "[" * 30000 + "]" * 30000 + "}")


def listing(path: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli_run(["list", str(path)]) == 0


def slowest_fuzz_case(cases: int) -> float:
    from tests import test_fuzz

    seeds = test_fuzz._seeds()
    rng = random.Random(test_fuzz.SEED)
    slowest = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.llma"
        for case in range(cases):
            path.write_bytes(test_fuzz.mutate(rng, seeds[case % len(seeds)]))
            start = time.perf_counter()
            with contextlib.suppress(Exception):
                test_fuzz.exercise(path, None)
            slowest = max(slowest, time.perf_counter() - start)
    return slowest


def main() -> None:
    deep = [("/".join(["d"] * 600) + f"/{i}", False) for i in range(2000)]
    rows = [("deep JSON (30,000 levels) refused", timed(deep_json), 1.0),
            ("check_names, 2,000 names 600 deep", timed(lambda: check_names(deep)), 3.0)]
    with tempfile.TemporaryDirectory() as tmp:
        deep_path = Path(tmp) / "deep.llma"
        deep_path.write_bytes(raw_archive([(name, b"") for name, _ in deep]))
        rows.append(("list, 2,000 names 600 deep", timed(lambda: listing(deep_path)), 10.0))
        many = Path(tmp) / "many.llma"
        many.write_bytes(raw_archive([(f"dir{i % 50}/file-{i:05d}.txt", b"")
                                      for i in range(20000)]))
        rows.append(("list, 20,000 entries", timed(lambda: listing(many)), 10.0))
    rows.append(("slowest of 2,000 fuzz cases", slowest_fuzz_case(2000), 5.0))
    print(f"{'case':<40} {'seconds':>8}  {'old test limit':>14}")
    for label, seconds, limit in rows:
        print(f"{label:<40} {seconds:8.3f}  {limit:14.1f}")


if __name__ == "__main__":
    main()
