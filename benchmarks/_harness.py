"""What the HTTP benchmarks share: the fake provider's process, the clients, child runs, tables.

Every figure comes from a fresh client process (``python bench_x.py --child SPEC``)
talking to the tests' fake provider in another process, so the client's CPU time
and memory are its own. Three kinds of client are measured on each wire format:

    floor       bare http.client on a keep-alive connection: json.dumps the request,
                json.loads the reply (or every stream frame) and pick out the text;
                the least any Python client must do
    casual_llm  ``Model`` on the matching client
    SDK         the official package (openai, anthropic, ollama), when importable
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

# Children import only what they measure: argparse, subprocess and statistics are
# imported where the parent uses them, so they stay out of the children's RSS.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
# --module measures another copy of casual_llm.py (a branch, a trial fix); the children
# inherit the variable, the fake provider keeps the checkout's.
if os.environ.get("CASUAL_LLM_BENCH_DIR"):
    sys.path.insert(0, os.environ["CASUAL_LLM_BENCH_DIR"])

# Loopback only: no proxy may stand between a benchmark and its fake provider.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
# Children import casual_llm from cached bytecode, as an installed copy would: without it
# (PYTHONDONTWRITEBYTECODE=1) every start compiles the 4,700-line module again, which costs
# about 35 ms and 13 MB of peak RSS. fake_provider() writes the cache before any child starts.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

FORMATS = ("openai", "anthropic", "ollama")
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-x", "ollama": "llama3.2"}
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages", "ollama": "/api/chat"}
PROMPT = "Say hello"
MAX_TOKENS = 64
CHILD_TIMEOUT = 120.0  # no child outlives this, whatever the server does


# === The fake provider ============================================================================

# The rows of the two stream scripts: row -> (label, its SDK twin).
STREAM_ROWS: dict[str, tuple[str, str | None]] = {
    "floor": ("floor http.client read1 + json.loads", None),
    "casual_async": ("casual_llm async for in Model.stream", "sdk_async"),
    "casual_sync": ("casual_llm for in Model.stream_sync", "sdk_sync"),
    "sdk_async": ("SDK async stream", None),
    "sdk_sync": ("SDK sync stream", None),
}


@contextlib.contextmanager
def fake_provider(mode: str, lifetime: float = 300.0) -> Iterator[str]:
    """Start ``_server.py MODE`` in its own process and yield its URL; stop it on exit."""
    import py_compile
    import subprocess
    for folder in {ROOT, os.environ.get("CASUAL_LLM_BENCH_DIR") or ROOT}:
        py_compile.compile(os.path.join(folder, "casual_llm.py"))  # __pycache__ is git-ignored
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_server.py"), mode, str(lifetime)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        if not url.startswith("http://"):
            raise RuntimeError(f"the fake provider did not start (printed {url!r})")
        yield url
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# === Clients ======================================================================================

def sdk_available(fmt: str) -> bool:
    """Whether the official package for ``fmt`` imports."""
    import importlib.util
    return importlib.util.find_spec(fmt) is not None


def skip_reason(row: str, fmt: str, args: argparse.Namespace) -> str:
    """Why an SDK row is not measured (``""`` when it is)."""
    if not row.startswith("sdk"):
        return ""
    if args.no_sdk:
        return "skipped: --no-sdk"
    return "" if sdk_available(fmt) else f"skipped: no {fmt} package"


def casual_model(fmt: str, url: str) -> Any:
    """A ``casual_llm.Model`` on the fake provider."""
    import casual_llm
    if fmt == "openai":
        client: Any = casual_llm.OpenAIClient(api_key="bench", base_url=url + "/v1")
    elif fmt == "anthropic":
        client = casual_llm.AnthropicClient(api_key="bench", base_url=url)
    else:
        client = casual_llm.OllamaClient(host=url)
    return casual_llm.Model(client, MODELS[fmt])


def casual_messages() -> list[Any]:
    import casual_llm
    return [casual_llm.UserMessage(content=PROMPT)]


def _floor_body(fmt: str, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": MODELS[fmt], "messages": [{"role": "user", "content": PROMPT}],
                            "max_tokens": MAX_TOKENS, "stream": stream}
    return json.dumps(body, separators=(",", ":")).encode()


def _text_of(fmt: str, obj: Any) -> str:
    """The text of a whole (non-streamed) reply."""
    if fmt == "openai":
        return obj["choices"][0]["message"]["content"]
    if fmt == "anthropic":
        return obj["content"][0]["text"]
    return obj["message"]["content"]


def _delta_of(fmt: str, obj: Any) -> str | None:
    """The text of one stream frame, if it has any."""
    if fmt == "openai":
        choices = obj.get("choices")
        return choices[0]["delta"].get("content") if choices else None
    if fmt == "anthropic":
        return obj["delta"].get("text") if obj.get("type") == "content_block_delta" else None
    return obj["message"].get("content") if "message" in obj else None


class Floor:
    """The least a client can do: one keep-alive http.client connection, no checks."""

    def __init__(self, fmt: str, url: str) -> None:
        self.fmt = fmt
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port))
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}

    def chat(self) -> str:
        self.conn.request("POST", PATHS[self.fmt], _floor_body(self.fmt, False), self.headers)
        return _text_of(self.fmt, json.loads(self.conn.getresponse().read()))

    def stream(self) -> Iterator[str]:
        """Text pieces, decoded frame by frame as read1 returns bytes."""
        self.conn.request("POST", PATHS[self.fmt], _floor_body(self.fmt, True), self.headers)
        resp = self.conn.getresponse()
        ndjson = self.fmt == "ollama"
        tail = b""
        while data := resp.read1(65536):
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            for line in lines:
                if ndjson:
                    if not line.strip():
                        continue
                elif line.startswith(b"data: {"):
                    line = line[6:]
                else:
                    continue
                text = _delta_of(self.fmt, json.loads(line))
                if text:
                    yield text


class SDK:
    """The official package's client, sync and async, reduced to chat and stream."""

    def __init__(self, fmt: str, url: str, asynchronous: bool) -> None:
        self.fmt = fmt
        if fmt == "openai":
            import openai
            cls: Any = openai.AsyncOpenAI if asynchronous else openai.OpenAI
            self.client = cls(api_key="bench", base_url=url + "/v1")
        elif fmt == "anthropic":
            import anthropic
            cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
            self.client = cls(api_key="bench", base_url=url)
        else:
            import ollama
            cls = ollama.AsyncClient if asynchronous else ollama.Client
            self.client = cls(host=url)
        self.messages = [{"role": "user", "content": PROMPT}]

    def _call(self, stream: bool) -> Any:
        """The SDK call: a reply or a stream (awaitable for the async clients)."""
        model = MODELS[self.fmt]
        if self.fmt == "openai":
            return self.client.chat.completions.create(
                model=model, messages=self.messages, max_tokens=MAX_TOKENS, stream=stream)
        if self.fmt == "anthropic":
            return self.client.messages.create(
                model=model, messages=self.messages, max_tokens=MAX_TOKENS, stream=stream)
        return self.client.chat(model=model, messages=self.messages,
                                options={"num_predict": MAX_TOKENS}, stream=stream)

    def _text(self, reply: Any) -> str:
        if self.fmt == "openai":
            return reply.choices[0].message.content
        if self.fmt == "anthropic":
            return reply.content[0].text
        return reply.message.content

    def _delta(self, event: Any) -> str | None:
        if self.fmt == "openai":
            return event.choices[0].delta.content if event.choices else None
        if self.fmt == "anthropic":
            return event.delta.text if event.type == "content_block_delta" else None
        return event.message.content

    def chat(self) -> str:
        return self._text(self._call(False))

    async def achat(self) -> str:
        return self._text(await self._call(False))

    def stream(self) -> Iterator[str]:
        for event in self._call(True):
            text = self._delta(event)
            if text:
                yield text

    async def astream(self) -> Any:
        async for event in await self._call(True):
            text = self._delta(event)
            if text:
                yield text


# === Child processes ==============================================================================

def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def profiled(fn: Callable[[], Any], top: int = 30) -> Any:
    """Run ``fn`` under cProfile in every thread it starts; print the top functions to stderr."""
    import cProfile
    import pstats
    import threading
    profiles = [cProfile.Profile()]

    def start(*_: Any) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()

    threading.setprofile(start)
    profiles[0].enable()
    try:
        return fn()
    finally:
        profiles[0].disable()
        threading.setprofile(None)
        stats = pstats.Stats(profiles[0], stream=sys.stderr)
        for profile in profiles[1:]:
            stats.add(profile)
        print(f"--- cProfile, {len(profiles)} thread(s), by own time ---", file=sys.stderr)
        stats.strip_dirs().sort_stats("tottime").print_stats(top)


def child_main(runners: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """Entry of a child: ``--child SPEC`` runs ``runners[SPEC["row"]](**SPEC)`` and prints
    its result as one JSON line; ``SPEC["profile"]`` runs it under cProfile."""
    spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
    runner = runners[spec["row"]]
    if spec.pop("profile", False):
        result = profiled(lambda: runner(**spec))
    else:
        result = runner(**spec)
    print(json.dumps(result), flush=True)


def entry(main: Callable[[], None], child: Callable[..., dict[str, Any]],
          rows: Iterable[str]) -> None:
    """A script's ``__main__``: a child process runs one row, the parent runs ``main``."""
    if "--child" in sys.argv:
        child_main({row: child for row in rows})
    else:
        main()


def report(title: str, rows: list[Row], as_json: bool) -> None:
    """Print the table, and the rows as JSON when asked."""
    print_table(title, rows)
    if as_json:
        print(rows_json(rows))


def run_child(script: str, **spec: Any) -> dict[str, Any] | str:
    """Run one row in a fresh process; its result dict, or the reason it failed."""
    import subprocess
    try:
        proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return f"timed out after {CHILD_TIMEOUT:g} s"
    if proc.stderr.strip() and (spec.get("profile") or proc.returncode):
        sys.stderr.write(f"=== {spec['fmt']} {spec['row']} ===\n{proc.stderr}\n")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed (exit {proc.returncode}): {last}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a few seconds, rougher figures")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated wire formats (default: all three)")
    parser.add_argument("--no-sdk", action="store_true", help="skip the official SDKs' rows")
    parser.add_argument("--profile", default="",
                        help="comma-separated rows to run under cProfile (e.g. casual_async); "
                             "the profile goes to stderr and slows those rows")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    parser.add_argument("--module", default="",
                        help="measure this casual_llm.py (or its folder) instead of the checkout's")
    if extra:
        extra(parser)
    args = parser.parse_args()
    if args.module:
        folder = args.module if os.path.isdir(args.module) else os.path.dirname(args.module)
        os.environ["CASUAL_LLM_BENCH_DIR"] = os.path.abspath(folder)
    where = os.environ.get("CASUAL_LLM_BENCH_DIR") or ROOT
    print(f"casual_llm from {os.path.join(where, 'casual_llm.py')}; {sys.executable} "
          f"{sys.version.split()[0]}")
    args.formats = [f for f in args.formats.split(",") if f]
    args.profile = {r for r in args.profile.split(",") if r}
    return args


# === Tables =======================================================================================

class Row:
    """One figure: what was measured, by which client, and how it compares."""

    def __init__(self, fmt: str, row: str, label: str, value: float | None, unit: str, *,
                 target: float | None, higher_is_better: bool, note: str = "",
                 twin: str | None = None) -> None:
        self.fmt, self.row, self.label, self.value, self.unit = fmt, row, label, value, unit
        self.target, self.higher = target, higher_is_better
        self.note, self.twin = note, twin  # twin: the SDK row this one is compared with


def _fmt_value(value: float, unit: str) -> str:
    if value >= 100:
        text = f"{value:,.0f}"
    elif value >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}"


def _ratio(ours: float | None, other: float | None) -> str:
    if not ours or not other:
        return "-"
    return f"{ours / other:.2f}x"


def print_table(title: str, rows: list[Row], floor_row: str = "floor") -> None:
    """Rows with their ratio to the target (met or not), to the floor and to their SDK twin.

    A ratio is always ours / theirs: above 1 is better for rates, worse for times.
    """
    by_key = {(r.fmt, r.row): r for r in rows}
    print(f"\n{title}")
    head = (f"{'format':10} {'client':34} {'figure':>16} {'/target':>14} {'/floor':>8} "
            f"{'/SDK':>7}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.value is None:
            print(f"{r.fmt:10} {r.label:34} {'-':>16} {'':>14} {'':>8} {'':>7}  {r.note}")
            continue
        target = "-"
        if r.target:
            met = r.value >= r.target if r.higher else r.value <= r.target
            target = f"{r.value / r.target:.2f}x {'ok' if met else 'MISS'}"
        floor = by_key.get((r.fmt, floor_row))
        twin = by_key.get((r.fmt, r.twin)) if r.twin else None
        print(f"{r.fmt:10} {r.label:34} {_fmt_value(r.value, r.unit):>16} {target:>14} "
              f"{_ratio(r.value, floor.value if floor else None):>8} "
              f"{_ratio(r.value, twin.value if twin else None):>7}  {r.note}")


def rows_json(rows: list[Row]) -> str:
    return json.dumps([{k: v for k, v in vars(r).items()} for r in rows], indent=1)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, by linear interpolation."""
    import statistics
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, int(q * 100) - 1)]


def bounded_loop(call: Callable[[], Any], seconds: float, max_calls: int) -> tuple[int, float,
                                                                                   float]:
    """Call ``call`` until ``seconds`` pass or ``max_calls`` are made: (calls, wall, cpu)."""
    n = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while n < max_calls:
        call()
        n += 1
        if not n % 16 and time.perf_counter() > deadline:
            break
    return n, time.perf_counter() - t0, time.process_time() - cpu0
