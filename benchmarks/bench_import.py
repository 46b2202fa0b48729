"""Start-up cost: ``import casual_llm`` over a bare interpreter, its top contributors, the CLI.

    python benchmarks/bench_import.py [--quick] [--runs N]

Targets: ``import casual_llm`` adds at most 25 ms to ``python -c pass`` (median of
interleaved runs), and ``python -m casual_llm --version`` / ``--help`` finish in
under 60 ms of wall time. Measured with the module's bytecode cached, as an
installed copy has it, and again compiling from source on every start (what
PYTHONDONTWRITEBYTECODE=1 without a cache gives). ``-X importtime`` then lists
what the import spends its time on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_TARGET_MS = 25.0
CLI_TARGET_MS = 60.0


def _env(cached: bool) -> dict[str, str]:
    """The environment of a run: bytecode written and reused, or never written."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    if not cached:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(argv: list[str], env: dict[str, str], cwd: str
         ) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=30, check=False)
    return (time.perf_counter() - t0) * 1000, proc


def _medians(commands: dict[str, list[str]], env: dict[str, str], cwd: str, runs: int
             ) -> dict[str, Any]:
    """Median wall ms of each command, runs interleaved so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    last: dict[str, subprocess.CompletedProcess[str]] = {}
    for argv in commands.values():  # one untimed run each: page cache, bytecode
        _run(argv, env, cwd)
    for _ in range(runs):
        for name, argv in commands.items():
            ms, last[name] = _run(argv, env, cwd)
            times[name].append(ms)
    return {name: (statistics.median(ms), last[name]) for name, ms in times.items()}


def _importtime(env: dict[str, str], cwd: str, runs: int
                ) -> tuple[float, list[tuple[str, float, float]]]:
    """casual_llm's own import time and each module it imports: (name, self us, cumulative us),
    medians over ``runs``; modules the interpreter loaded before (site's) are not counted."""
    per: dict[str, list[tuple[int, int]]] = {}
    totals = []
    for _ in range(runs):
        _, proc = _run(["-X", "importtime", "-c", "import casual_llm"], env, cwd)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
        rows = []
        for line in lines[1:]:  # the first line is the header
            self_us, cum_us, name = line.split(":", 1)[1].split("|")
            rows.append((name[1:].rstrip(), int(self_us), int(cum_us)))  # 2 spaces a level
        # importtime prints children before their parent: casual_llm's subtree is every
        # line between the previous top-level entry and casual_llm's own line.
        end = next(i for i, r in enumerate(rows) if r[0] == "casual_llm")
        start = max((i for i, r in enumerate(rows[:end]) if not r[0].startswith("  ")),
                    default=-1) + 1
        totals.append(rows[end][2])
        for name, self_us, cum_us in rows[start:end + 1]:
            per.setdefault(name.strip(), []).append((self_us, cum_us))
    table = [(name, statistics.median(s for s, _ in v), statistics.median(c for _, c in v))
             for name, v in per.items()]
    table.sort(key=lambda r: -r[1])
    return statistics.median(totals), table


def _cli_note(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode == 0:
        return f"exit 0, {len(proc.stdout.splitlines())} line(s) of output"
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    stub = " (the CLI is still a stub)" if "NotImplementedError" in last else ""
    return f"exit {proc.returncode}: {last[:70]}{stub}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, rougher figures")
    parser.add_argument("--runs", type=int, default=0, help="timed runs per command (default 20)")
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 20)
    commands = {
        "python -c pass": ["-c", "pass"],
        "python -c 'import casual_llm'": ["-c", "import casual_llm"],
        "python -m casual_llm --version": ["-m", "casual_llm", "--version"],
        "python -m casual_llm --help": ["-m", "casual_llm", "--help"],
    }
    # Each case runs on its own copy of the module, so a __pycache__ beside the checkout's
    # copy (or its absence) changes nothing; stdlib modules keep their installed bytecode.
    with tempfile.TemporaryDirectory(prefix="casual_llm-bench-") as tmp:
        dirs = {case: os.path.join(tmp, case) for case in ("cached", "source")}
        for folder in dirs.values():
            os.mkdir(folder)
            shutil.copy(os.path.join(ROOT, "casual_llm.py"), folder)
        _, proc = _run(["-c", "import sys; print(len(sys.modules))"], _env(True), dirs["cached"])
        print(f"{sys.executable} {sys.version.split()[0]}, median of {runs} interleaved runs "
              f"(wall ms, fork and exec included)")
        print(f"The bare interpreter starts with {proc.stdout.strip()} modules loaded: what its "
              f"site already imports (e.g. typing, via a .pth file) costs casual_llm nothing\n"
              f"here, so a clean venv (about 30 modules at start) gives the larger figure.")
        print(f"\n{'command':34} {'bytecode cached':>16} {'compiled each run':>18}  "
              f"{'/target':>12}  note")
        cached = _medians(commands, _env(True), dirs["cached"], runs)
        source = _medians(commands, _env(False), dirs["source"], runs)
        base_c, base_s = cached["python -c pass"][0], source["python -c pass"][0]
        for name in commands:
            (ms_c, proc), ms_s = cached[name], source[name][0]
            target, note = "", ""
            if name.startswith("python -c 'import"):
                added = ms_c - base_c
                target = f"{added / IMPORT_TARGET_MS:.2f}x {'ok' if added <= 25 else 'MISS'}"
                note = (f"adds {added:.1f} ms cached, {ms_s - base_s:.1f} ms compiling "
                        f"(target <= {IMPORT_TARGET_MS:g} ms added)")
            elif name.startswith("python -m"):
                met = ms_c < CLI_TARGET_MS and proc.returncode == 0
                target = f"{ms_c / CLI_TARGET_MS:.2f}x {'ok' if met else 'MISS'}"
                note = _cli_note(proc)
            print(f"{name:34} {ms_c:13.1f} ms {ms_s:15.1f} ms  {target:>12}  {note}")
        total, table = _importtime(_env(True), dirs["cached"], max(3, runs // 4))
        print(f"\n-X importtime of 'import casual_llm' (bytecode cached): {total / 1000:.1f} ms "
              f"in the import itself, median of {max(3, runs // 4)} runs")
        print(f"{'module':36} {'self ms':>8} {'cumulative ms':>14}")
        for name, self_us, cum_us in sorted(table, key=lambda r: -r[1])[:15]:
            print(f"{name:36} {self_us / 1000:8.2f} {cum_us / 1000:14.2f}")


if __name__ == "__main__":
    main()
