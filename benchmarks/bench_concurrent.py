"""512 concurrent chat calls against a server that answers each after 500 ms: wall time and RSS.

    python benchmarks/bench_concurrent.py [--quick] [--no-sdk] [--calls N] [--profile ROW]

Targets: the 512 calls done in under 0.8 s (the server's 0.5 s plus 0.3 s), and the
client process's peak RSS under 60 MB. Every row runs in a fresh client process
that first imports its client and makes one call (so the import and one warm
connection are in "RSS before"; --quick skips that call), then makes two rounds
(one with --quick) of N concurrent calls:
"cold" needs N new connections (and, for casual_llm, new worker threads), "warm"
reuses whatever the first round left. The floor is one thread and one http.client
connection per call; the "server-bound" row drives raw sockets from one thread with
next to no client work, so it shows how fast the fake provider itself goes (it, not
the client, sets the pace here: compare the clients' CPU time too).
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from typing import Any

import _harness as h

WALL_TARGET = 0.8
RSS_TARGET = 60.0
ROWS = {  # row -> (label, SDK twin)
    "raw": ("server-bound: raw sockets, 1 thread", None),
    "floor": ("floor http.client, a thread per call", None),
    "casual_async": ("casual_llm gather(Model.chat)", "sdk_async"),
    "sdk_async": ("SDK async client, gather", None),
}


def _floor_round(fmt: str, url: str, calls: int, conns: list[h.Floor]) -> None:
    """One call on each of ``calls`` threads, each with its own keep-alive connection."""
    while len(conns) < calls:
        conns.append(h.Floor(fmt, url))
    threads = [threading.Thread(target=conn.chat) for conn in conns[:calls]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _raw_round(fmt: str, url: str, calls: int, socks: list[socket.socket]) -> None:
    """One request on each of ``calls`` keep-alive sockets driven by one selector: next to
    no client work, so this row shows how fast the fake provider itself can go."""
    host, port = url.removeprefix("http://").split(":")
    body = h._floor_body(fmt, False)
    request = (f"POST {h.PATHS[fmt]} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    while len(socks) < calls:
        socks.append(socket.create_connection((host, int(port))))
    with selectors.DefaultSelector() as sel:
        for sock in socks[:calls]:
            sock.sendall(request)
            sel.register(sock, selectors.EVENT_READ, [b""])
        left = calls
        while left:
            for key, _ in sel.select(10):
                buf = key.data[0] = key.data[0] + key.fileobj.recv(65536)
                head, sep, rest = buf.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), -1)
                if sep and len(rest) >= length:
                    sel.unregister(key.fileobj)
                    left -= 1


def child(row: str, fmt: str, url: str, calls: int, rounds: int) -> dict[str, Any]:
    walls: list[float] = []
    cpus: list[float] = []
    if row in ("raw", "floor"):
        one_round = _raw_round if row == "raw" else _floor_round
        kept: list[Any] = []  # the sockets or connections, alive across rounds
        if rounds > 1:
            one_round(fmt, url, 1, kept)
        before = h.rss_mb()
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            one_round(fmt, url, calls, kept)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    else:
        if row == "casual_async":
            model, messages = h.casual_model(fmt, url), h.casual_messages()

            def call() -> Any:
                return model.chat(messages, max_tokens=h.MAX_TOKENS)
        else:
            call = h.SDK(fmt, url, asynchronous=True).achat

        before = 0.0

        async def measured() -> None:
            nonlocal before
            if rounds > 1:
                await call()
            before = h.rss_mb()
            for _ in range(rounds):
                t0, c0 = time.perf_counter(), time.process_time()
                replies = await asyncio.gather(*(call() for _ in range(calls)))
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                assert len(replies) == calls

        asyncio.run(measured())
    return {"cold": walls[0], "warm": walls[-1] if rounds > 1 else None, "cpu": cpus[0],
            "rss_before": before, "peak_rss": h.peak_rss_mb(),
            "threads": threading.active_count()}


def main() -> None:
    args = h.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--calls", type=int, default=0, help="concurrent calls per round (default 512)"))
    calls = args.calls or (128 if args.quick else 512)
    walls: list[h.Row] = []
    rss: list[h.Row] = []
    with h.fake_provider("delay") as url:
        for fmt in args.formats:
            for row, (label, twin) in ROWS.items():
                skip = h.skip_reason(row, fmt, args)
                result = skip or h.run_child(__file__, row=row, fmt=fmt, url=url, calls=calls,
                                             rounds=1 if args.quick else 2,
                                             profile=row in args.profile)
                if isinstance(result, str):
                    for table in (walls, rss):
                        table.append(h.Row(fmt, row, label, None, "", target=None,
                                           higher_is_better=False, note=result))
                    continue
                note = f"client CPU {result['cpu']:.2f} s"
                if result["warm"] is not None:
                    note += f"; warm round {result['warm']:.2f} s"
                walls.append(h.Row(fmt, row, label, result["cold"], "s", target=WALL_TARGET,
                                   higher_is_better=False, twin=twin, note=note))
                rss.append(h.Row(fmt, row, label, result["peak_rss"], "MB", target=RSS_TARGET,
                                 higher_is_better=False, twin=twin,
                                 note=f"{result['rss_before']:.1f} MB before the rounds, "
                                      f"{result['threads']} threads after"))
    h.print_table(f"{calls} concurrent calls, server delay 0.5 s: wall time of the cold round "
                  f"(target < {WALL_TARGET} s)", walls)
    h.print_table(f"Peak RSS of the client process (target < {RSS_TARGET:.0f} MB)", rss)
    if args.json:
        print(h.rows_json(walls + rss))


if __name__ == "__main__":
    h.entry(main, child, ROWS)
