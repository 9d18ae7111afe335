"""Who uses the CPUs while something runs: per process, and per thread of the busiest processes.

Reads /proc twice, `--seconds` apart, and prints each process's (and thread's) share of one core over
the window. Run it beside a training run to see what Ray's own processes (raylet, GCS, dashboard, the
Train controller) and a worker's background threads take from the training threads.

    uv run python benchmarks/cpu_census.py [--seconds 30] [--top 12] [--threads-of PATTERN]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(stat_file: Path) -> tuple[str, int] | None:
    try:
        text = stat_file.read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return name, int(fields[11]) + int(fields[12])  # utime + stime


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def snapshot(threads_of: str) -> tuple[dict[str, tuple[str, int]], dict[tuple[str, str], tuple[str, int]]]:
    processes, threads = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        got = _cpu_ticks(entry / "stat")
        if got is None:
            continue
        cmd = _cmdline(entry.name) or got[0]
        processes[entry.name] = (cmd, got[1])
        if threads_of and threads_of in cmd:
            for task in (entry / "task").glob("*"):
                t = _cpu_ticks(task / "stat")
                if t is not None:
                    threads[(entry.name, task.name)] = t
    return processes, threads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads-of", default="", help="also list threads of processes whose command line contains this")
    args = p.parse_args(argv)
    before, threads_before = snapshot(args.threads_of)
    started = time.monotonic()
    time.sleep(args.seconds)
    after, threads_after = snapshot(args.threads_of)
    window = (time.monotonic() - started) * TICKS
    used = sorted(((ticks - before[pid][1], pid, cmd) for pid, (cmd, ticks) in after.items() if pid in before), reverse=True)
    total = sum(u for u, _, _ in used)
    print(f"{'pid':>8} {'% of a core':>12}  command ({args.seconds:.0f} s window; all processes: {100 * total / window:.0f}% of a core)")
    for ticks, pid, cmd in used[:args.top]:
        print(f"{pid:>8} {100 * ticks / window:>11.1f}%  {cmd[:110]}")
    if threads_after:
        print(f"\nthreads of processes matching {args.threads_of!r}")
        rows = sorted(((ticks - threads_before[key][1], key, name) for key, (name, ticks) in threads_after.items()
                       if key in threads_before), reverse=True)
        for ticks, (pid, tid), name in rows:
            if ticks:
                print(f"{pid:>8} {tid:>8} {100 * ticks / window:>8.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
