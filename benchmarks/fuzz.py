"""Fuzz every public entry point and print the outcome table (the suite runs the same cases at a small budget).

    python benchmarks/fuzz.py                 # 2,000 cases per entry point
    python benchmarks/fuzz.py --cases 500 --json fuzz.json

Cases come from tests/fuzzing.py: valid arguments, or valid arguments with exactly one made invalid. Each entry
point runs in a child process, so a case that kills the process (a segfault, a SIGFPE in a native library) is
counted as a crash and the run goes on from the next case. Outcomes:

* correct: valid input, answered as an independent numpy/float64 computation answers it;
* clear error: invalid input refused with a ValueError/TypeError naming the argument;
* wrong name: refused with a ValueError/TypeError that names another argument or none;
* raw error: any other exception (IndexError, AttributeError, a FAISS or torch error), or valid input refused;
* silent wrong: invalid input accepted, or valid input answered wrongly;
* crash: the child process died.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
COLUMNS = ("correct", "clear error", "wrong name", "raw error", "silent wrong", "crash")


def _entries(directory: Path) -> list:  # type: ignore[type-arg]
    sys.path.insert(0, str(TESTS))
    import fuzzing

    return [*fuzzing.ENTRIES, *fuzzing.file_entries(directory)]


def child(name: str, start: int, stop: int) -> None:
    """Run cases ``start..stop`` of entry ``name``; one JSON line per case on stdout."""
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(TESTS))
    import fuzzing

    with tempfile.TemporaryDirectory() as directory:
        (entry,) = [entry for entry in _entries(Path(directory)) if entry.name == name]
        for seed in range(start, stop):
            print(json.dumps({"seed": seed, "started": True}), flush=True)
            outcome, case, detail = fuzzing.run_case(entry, seed)
            line = {"seed": seed, "outcome": outcome, "argument": case.corrupted, "how": case.how}
            if outcome not in ("correct", "clear error"):
                line["detail"] = detail.splitlines()[0][:300] if detail else ""
            print(json.dumps(line), flush=True)


def run_entry(name: str, cases: int) -> tuple[dict[str, int], list[dict[str, object]]]:
    """All cases of one entry point, restarting the child after a crash."""
    counts = dict.fromkeys(COLUMNS, 0)
    failures: list[dict[str, object]] = []
    next_seed = 0
    while next_seed < cases:
        command = [sys.executable, __file__, "--child", name, str(next_seed), str(cases)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout is not None
        started = None
        for line in process.stdout:
            record = json.loads(line)
            if record.get("started"):
                started = int(record["seed"])
                continue
            counts[str(record["outcome"])] += 1
            next_seed = int(record["seed"]) + 1
            started = None
            if record["outcome"] not in ("correct", "clear error"):
                failures.append({"entry": name, **record})
        code = process.wait()
        if code != 0 and started is not None:
            counts["crash"] += 1
            failures.append({"entry": name, "seed": started, "outcome": "crash", "detail": f"exit code {code}"})
            next_seed = started + 1
        elif code != 0:
            raise RuntimeError(f"the child for {name} failed before its first case (exit code {code})")
    return counts, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="cases per entry point (default 2000)")
    parser.add_argument("--only", help="run only the entry points whose name contains this")
    parser.add_argument("--json", help="also write the table and every failure to this file")
    parser.add_argument("--child", nargs=3, metavar=("ENTRY", "START", "STOP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    with tempfile.TemporaryDirectory() as directory:
        names = [entry.name for entry in _entries(Path(directory))]
    names = [name for name in names if args.only is None or args.only in name]
    started = time.perf_counter()
    table: dict[str, dict[str, int]] = {}
    failures: list[dict[str, object]] = []
    print(f"{'entry point':<38}{'cases':>7}" + "".join(f"{column:>14}" for column in COLUMNS))
    for name in names:
        counts, found = run_entry(name, args.cases)
        table[name], failures = counts, failures + found
        print(f"{name:<38}{args.cases:>7}" + "".join(f"{counts[column]:>14,}" for column in COLUMNS), flush=True)
    totals = {column: sum(row[column] for row in table.values()) for column in COLUMNS}
    print(f"{'all':<38}{args.cases * len(names):>7}" + "".join(f"{totals[column]:>14,}" for column in COLUMNS))
    print(f"\n{args.cases * len(names):,} cases in {time.perf_counter() - started:.0f} s")
    for failure in failures[:20]:
        print("  ", json.dumps(failure))
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "failures": failures}, indent=2))


if __name__ == "__main__":
    main()
