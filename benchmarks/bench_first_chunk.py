"""Time to first chunk: from the server writing the first text to that text reaching user code.

    python benchmarks/bench_first_chunk.py [--quick] [--no-sdk] [--streams N] [--profile ROW]

Target: under 2 ms. The server stamps the first text with ``time.time()`` just
before writing it (headers and any earlier frames go in the same write), then
waits 5 ms before each later frame, so a client that waits for more bytes
before handing the text over shows it. The stamp is taken a few tens of
microseconds before the write, so every row, the floor's included, carries
that much of the server's own time. Median and 90th percentile of N streams on
one keep-alive connection, after one untimed stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import _harness as h

TARGET_MS = 2.0
ROWS = h.STREAM_ROWS


def _gap(text: str) -> float:
    """Milliseconds since the server stamped ``text``."""
    return (time.time() - float(text)) * 1000


def _first_gap(pieces: Any) -> float:
    """The first piece's gap; the stream is read to its end so the connection is reused."""
    gap = None
    for text in pieces:
        if gap is None:
            gap = _gap(text)
    assert gap is not None
    return gap


async def _afirst_gap(pieces: Any) -> float:
    gap = None
    async for text in pieces:
        if gap is None:
            gap = _gap(text)
    assert gap is not None
    return gap


async def _texts(stream: Any) -> Any:
    async for chunk in stream:
        if chunk.content:
            yield chunk.content


def _one_stream(row: str, fmt: str, url: str) -> Callable[[], float]:
    """A function that reads one whole stream and returns its first chunk's gap."""
    if row == "floor":
        floor = h.Floor(fmt, url)
        return lambda: _first_gap(floor.stream())
    if row == "sdk_sync":
        sdk = h.SDK(fmt, url, asynchronous=False)
        return lambda: _first_gap(sdk.stream())
    if row.startswith("casual"):
        model, messages = h.casual_model(fmt, url), h.casual_messages()
        if row == "casual_sync":
            return lambda: _first_gap(c.content for c in model.stream_sync(messages)
                                      if c.content)
        def texts() -> Any:
            return _texts(model.stream(messages))
    else:
        sdk = h.SDK(fmt, url, asynchronous=True)
        texts = sdk.astream
    loop = asyncio.new_event_loop()
    return lambda: loop.run_until_complete(_afirst_gap(texts()))


def child(row: str, fmt: str, url: str, streams: int) -> dict[str, Any]:
    one = _one_stream(row, fmt, url)
    one()
    gaps = sorted(one() for _ in range(streams))
    return {"median": gaps[len(gaps) // 2], "p90": h.percentile(gaps, 0.9), "min": gaps[0]}


def main() -> None:
    args = h.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--streams", type=int, default=0, help="timed streams per row (default 25)"))
    streams = args.streams or (5 if args.quick else 25)
    rows: list[h.Row] = []
    with h.fake_provider("first") as url:
        for fmt in args.formats:
            for row, (label, twin) in ROWS.items():
                skip = h.skip_reason(row, fmt, args)
                result = skip or h.run_child(__file__, row=row, fmt=fmt, url=url,
                                             streams=streams, profile=row in args.profile)
                if isinstance(result, str):
                    rows.append(h.Row(fmt, row, label, None, "", target=None,
                                      higher_is_better=False, note=result))
                    continue
                note = f"p90 {result['p90']:.2f} ms, min {result['min']:.2f} ms"
                rows.append(h.Row(fmt, row, label, result["median"], "ms", target=TARGET_MS,
                                  higher_is_better=False, twin=twin, note=note))
    h.report(f"Time to first chunk, median of {streams} streams (target < {TARGET_MS} ms)",
             rows, args.json)


if __name__ == "__main__":
    h.entry(main, child, ROWS)
