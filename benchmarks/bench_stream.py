"""One stream of 20,000 small chunks, written by the server in one go: chunks/s reaching user code.

    python benchmarks/bench_stream.py [--quick] [--no-sdk] [--chunks N] [--profile ROW]

Target: at least 80,000 chunks/s through ``async for chunk in model.stream(...)``
(and ``stream_sync``). A rate is chunks / (time from sending the request to the last
chunk), best of a few streams on one keep-alive connection; "client CPU" is the
client's CPU time per chunk. The server needs a few ms to join its 20,000 frames
before the first byte leaves: that time is in every row, the floor's included.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import _harness as h

TARGET = 80_000.0
ROWS = h.STREAM_ROWS


def _measure(run_one: Any, repeats: int, chunks: int) -> dict[str, Any]:
    """Best and median of ``repeats`` timed streams (after one untimed one)."""
    run_one()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        got = run_one()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if got != chunks:
            raise RuntimeError(f"expected {chunks} chunks, got {got}")
    walls.sort()
    return {"best": walls[0], "median": walls[len(walls) // 2], "cpu": min(cpus)}


def child(row: str, fmt: str, url: str, chunks: int, repeats: int) -> dict[str, Any]:
    if row == "floor":
        floor = h.Floor(fmt, url)
        return _measure(lambda: sum(1 for _ in floor.stream()), repeats, chunks)
    if row == "casual_sync":
        model, messages = h.casual_model(fmt, url), h.casual_messages()
        return _measure(lambda: sum(1 for c in model.stream_sync(messages) if c.content),
                        repeats, chunks)
    if row == "sdk_sync":
        sdk = h.SDK(fmt, url, asynchronous=False)
        return _measure(lambda: sum(1 for _ in sdk.stream()), repeats, chunks)
    if row == "casual_async":
        model, messages = h.casual_model(fmt, url), h.casual_messages()

        async def one() -> int:
            n = 0
            async for chunk in model.stream(messages):
                if chunk.content:
                    n += 1
            return n
    else:
        sdk = h.SDK(fmt, url, asynchronous=True)

        async def one() -> int:
            n = 0
            async for _ in sdk.astream():
                n += 1
            return n

    loop = asyncio.new_event_loop()
    try:
        return _measure(lambda: loop.run_until_complete(one()), repeats, chunks)
    finally:
        loop.close()


def main() -> None:
    args = h.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--chunks", type=int, default=0, help="text chunks per stream (default 20,000)"))
    chunks = args.chunks or (5000 if args.quick else 20_000)
    rows: list[h.Row] = []
    with h.fake_provider(f"stream:{chunks}") as url:
        for fmt in args.formats:
            for row, (label, twin) in ROWS.items():
                skip = h.skip_reason(row, fmt, args)
                repeats = 1 if args.quick or row.startswith("sdk") else 3
                result = skip or h.run_child(__file__, row=row, fmt=fmt, url=url, chunks=chunks,
                                             repeats=repeats, profile=row in args.profile)
                if isinstance(result, str):
                    rows.append(h.Row(fmt, row, label, None, "", target=None,
                                      higher_is_better=True, note=result))
                    continue
                note = (f"client CPU {result['cpu'] / chunks * 1e6:.1f} us/chunk; "
                        f"median {chunks / result['median']:,.0f}/s of {repeats}")
                rows.append(h.Row(fmt, row, label, chunks / result["best"], "chunks/s",
                                  target=TARGET, higher_is_better=True, twin=twin, note=note))
    h.report(f"One stream of {chunks:,} chunks, coalesced (target >= {TARGET:,.0f} chunks/s)",
             rows, args.json)


if __name__ == "__main__":
    h.entry(main, child, ROWS)
