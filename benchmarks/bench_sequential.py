"""Sequential non-streaming calls per second, one call after another on a keep-alive connection.

    python benchmarks/bench_sequential.py [--quick] [--no-sdk] [--profile casual_async]

Target: at least 2,000 calls/s for ``await Model.chat`` and ``Model.chat_sync``. The
fake provider answers at once, in its own process; "client CPU" is the client
process's CPU time per call (a ceiling of 1e6 / that many calls/s on one core).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import _harness as h

TARGET = 2000.0
ROWS = {  # row -> (label, SDK twin)
    "floor": ("floor http.client (sync)", None),
    "casual_async": ("casual_llm await Model.chat", "sdk_async"),
    "casual_sync": ("casual_llm Model.chat_sync", "sdk_sync"),
    "sdk_async": ("SDK async client", None),
    "sdk_sync": ("SDK sync client", None),
}


def _async_loop(call: Any, seconds: float, max_calls: int) -> tuple[int, float, float]:
    async def run() -> tuple[int, float, float]:
        for _ in range(50):  # warm-up: connection, worker thread, caches
            await call()
        n = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + seconds
        while n < max_calls:
            await call()
            n += 1
            if not n % 16 and time.perf_counter() > deadline:
                break
        return n, time.perf_counter() - t0, time.process_time() - cpu0

    return asyncio.run(run())


def _sync_loop(call: Any, seconds: float, max_calls: int) -> tuple[int, float, float]:
    for _ in range(50):
        call()
    return h.bounded_loop(call, seconds, max_calls)


def child(row: str, fmt: str, url: str, seconds: float) -> dict[str, Any]:
    max_calls = 100_000
    if row == "floor":
        n, wall, cpu = _sync_loop(h.Floor(fmt, url).chat, seconds, max_calls)
    elif row.startswith("casual"):
        model, messages = h.casual_model(fmt, url), h.casual_messages()
        if row == "casual_async":
            n, wall, cpu = _async_loop(lambda: model.chat(messages, max_tokens=h.MAX_TOKENS),
                                       seconds, max_calls)
        else:
            n, wall, cpu = _sync_loop(lambda: model.chat_sync(messages, max_tokens=h.MAX_TOKENS),
                                      seconds, max_calls)
    elif row == "sdk_async":
        n, wall, cpu = _async_loop(h.SDK(fmt, url, asynchronous=True).achat, seconds, max_calls)
    else:
        n, wall, cpu = _sync_loop(h.SDK(fmt, url, asynchronous=False).chat, seconds, max_calls)
    return {"calls": n, "wall": wall, "cpu": cpu}


def main() -> None:
    args = h.parse_args(__doc__.splitlines()[0])
    seconds = 0.4 if args.quick else 2.0
    rows: list[h.Row] = []
    with h.fake_provider("plain") as url:
        for fmt in args.formats:
            for row, (label, twin) in ROWS.items():
                result = h.skip_reason(row, fmt, args) or h.run_child(
                    __file__, row=row, fmt=fmt, url=url, seconds=seconds,
                    profile=row in args.profile)
                if isinstance(result, str):
                    rows.append(h.Row(fmt, row, label, None, "", target=None,
                                      higher_is_better=True, note=result))
                    continue
                rate = result["calls"] / result["wall"]
                note = (f"client CPU {result['cpu'] / result['calls'] * 1e6:,.0f} us/call, "
                        f"{result['calls']:,} calls")
                rows.append(h.Row(fmt, row, label, rate, "calls/s", target=TARGET,
                                  higher_is_better=True, note=note, twin=twin))
    h.report(f"Sequential non-streaming calls/s (target >= {TARGET:,.0f})",
             rows, args.json)


if __name__ == "__main__":
    h.entry(main, child, ROWS)
