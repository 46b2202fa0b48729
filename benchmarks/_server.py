"""The fake provider of the tests, serving benchmark replies in a process of its own.

    python benchmarks/_server.py MODE [LIFETIME]

Prints the server's URL on one line, then serves until its standard input closes
or LIFETIME seconds (default 300) pass, whichever comes first. The reply depends
on the path (the wire format) and on the request's ``"stream"`` flag; MODE says
which replies:

    plain     a short reply at once (sequential calls)
    delay     a short reply after 500 ms (concurrent calls)
    stream    20,000 one-word chunks in one write (stream throughput); ``stream:N`` for N
    first     the first text chunk carries ``time.time()`` taken just before the
              server writes it; the rest follows after pauses (time to first chunk)
"""

import importlib
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
fake = importlib.import_module("test_casual_llm")  # from the root just put on the path

TEXT = "Hello! How can I help you today?"
FORMATS = {"/v1/chat/completions": "openai", "/chat/completions": "openai",
           "/v1/messages": "anthropic", "/api/chat": "ollama"}
FIRST_GAP = 0.005  # seconds between frames after the first text: more than the 2 ms target


def _replies(fmt, stream, pieces, **kw):
    if fmt == "openai":
        return (fake.openai_stream(pieces, usage=(10, len(pieces)), **kw) if stream
                else fake.openai_reply(TEXT, **kw))
    if fmt == "anthropic":
        return fake.anthropic_stream(pieces, **kw) if stream else fake.anthropic_reply(TEXT, **kw)
    return fake.ollama_stream(pieces, **kw) if stream else fake.ollama_reply(TEXT, **kw)


def _first_frames(fmt):
    """Frames of a stream whose first frame ends with the first text: everything before
    that text rides in the same write, so only the text's own latency is measured."""
    reply = _replies(fmt, True, ["@TS@", " and", " more"])
    frames = [f.encode() if isinstance(f, str) else f for f in reply.frames]
    first = next(i for i, f in enumerate(frames) if b"@TS@" in f)
    return [b"".join(frames[:first + 1]), *frames[first + 1:]], reply


def _first_reply(fmt):
    """A reply whose ``@TS@`` placeholder becomes the send time, as late as the server allows."""
    frames, template = _first_frames(fmt)

    def build(_recorded):
        stamp = repr(time.time()).encode()
        return fake.Reply(status=200, content_type=template.content_type,
                          frames=[frames[0].replace(b"@TS@", stamp), *frames[1:]],
                          frame_delay=FIRST_GAP)

    return build


def _script(mode):
    kind, _, count = mode.partition(":")
    chunks = int(count or 20000)
    table = {}
    for fmt in ("openai", "anthropic", "ollama"):
        if kind == "first":
            table[fmt, True] = _first_reply(fmt)
            table[fmt, False] = _replies(fmt, False, ())
        elif kind == "stream":
            table[fmt, True] = _replies(fmt, True, ["tok "] * chunks, coalesce=True)
            table[fmt, False] = _replies(fmt, False, ())
        else:
            delay = 0.5 if kind == "delay" else 0
            table[fmt, True] = _replies(fmt, True, ["Hello", "!"], delay=delay)
            table[fmt, False] = _replies(fmt, False, (), delay=delay)

    def answer(recorded):
        fmt = FORMATS.get(recorded.path.split("?")[0], "openai")
        body = recorded.json if isinstance(recorded.json, dict) else {}
        reply = table[fmt, bool(body.get("stream"))]
        return reply(recorded) if callable(reply) else reply

    return answer


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
    lifetime = float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
    provider = fake.FakeProvider(record=False)
    provider.default = _script(mode)
    print(provider.url, flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait(lifetime)
    provider.close(timeout=2)
    os._exit(0)  # daemon handler threads may still hold sockets; nothing left to flush


if __name__ == "__main__":
    main()
