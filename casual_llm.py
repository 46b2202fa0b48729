"""casual_llm: talk to OpenAI, Anthropic and Ollama with nothing but Python.

One stdlib-only module with the public API of ``casual-llm`` 0.5.0: messages,
tools, converters, three HTTP clients, ``Model``, config and factories, plus a
command line (``python -m casual_llm``).

Sections, in the order data flows (``grep -n '^# ===' casual_llm.py``):

 1. Errors
 2. Constants and small helpers
 3. Content, messages, usage
 4. Tools and schemas from Python types
 5. Structured output
 6. Transport
 7. Images
 8. Wire format: OpenAI
 9. Wire format: Ollama
10. Wire format: Anthropic
11. Clients
12. Model
13. Config and factories
14. Command line
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import inspect
import json
import math
import os
import re
import sys
import threading
import time
import typing
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, ClassVar, Literal, NoReturn, Protocol, TypeVar, Union

if __name__ == "__main__" and getattr(sys.modules["__main__"], "__dict__", None) is globals():
    # ``python -m casual_llm``: a later ``import casual_llm`` gets this module, not a copy.
    sys.modules.setdefault("casual_llm", sys.modules["__main__"])

if typing.TYPE_CHECKING:  # pragma: no cover - imported lazily at run time
    import asyncio
    import http.client
    import ipaddress
    import logging
    import ssl

__version__ = "0.5.0"

__all__ = [
    "__version__",
    # configuration
    "ClientConfig", "ModelConfig", "Provider",
    # clients and factories
    "LLMClient", "OpenAIClient", "AnthropicClient", "OllamaClient",
    "create_client", "create_model", "ScriptedClient", "ModelName",
    # model and its options
    "Model", "ChatOptions", "ToolEvent",
    # messages
    "ChatMessage", "UserMessage", "AssistantMessage", "SystemMessage",
    "ToolResultMessage", "AssistantToolCall", "AssistantToolCallFunction",
    "StreamChunk", "TextContent", "ImageContent", "message_from_dict",
    # tools
    "Tool", "ToolParameter",
    # usage
    "Usage",
    # tool converters
    "tool_to_openai", "tools_to_openai", "tool_to_anthropic", "tools_to_anthropic",
    "tool_to_ollama", "tools_to_ollama",
    # message converters
    "convert_messages_to_openai", "convert_messages_to_anthropic",
    "convert_messages_to_ollama", "convert_tool_calls_from_openai",
    "convert_tool_calls_from_anthropic", "convert_tool_calls_from_ollama",
    "extract_system_message", "extract_system_messages", "merge_system_messages",
    # structured output
    "validate_json_schema",
    # images
    "fetch_image_as_base64", "strip_base64_prefix", "add_base64_prefix",
    # errors
    "CasualLLMError", "ValidationError", "ConfigurationError", "UnsupportedProviderError",
    "SchemaValidationError", "ImageFetchError", "APIError", "APIConnectionError",
    "APITimeoutError", "APIStatusError", "BadRequestError", "AuthenticationError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "RequestTooLargeError",
    "UnprocessableEntityError", "RateLimitError", "InternalServerError",
    "OverloadedError", "StreamError", "MaxTurnsExceededError",
    # command line
    "main",
]



def _debugging() -> bool:
    """Whether debug records would go anywhere (cheap: checked per request)."""
    logging = sys.modules.get("logging")
    return logging is not None and logging.getLogger("casual_llm").isEnabledFor(logging.DEBUG)


class _LazyLogger:
    """The ``casual_llm`` logger, made on first use: importing logging costs start-up time."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        import logging
        return getattr(logging.getLogger("casual_llm"), name)


logger: logging.Logger = _LazyLogger()  # type: ignore[assignment]

# === 1. Errors ===============================================================


class CasualLLMError(Exception):
    """Root of every error casual_llm raises; every one pickles with its attributes."""

    def __reduce__(self) -> tuple[Any, ...]:
        # The default rebuilds by calling cls(*args), which fails for keyword-only
        # attributes (status_code=...): process pools could not send an APIStatusError
        # back. The attributes go as state, and one that cannot be pickled (a lambda as
        # a ValidationError's value) as the repr the message shows of it.
        import pickle
        import reprlib
        state = {}
        for name, value in vars(self).items():
            try:
                pickle.dumps(value)
            except Exception:
                value = reprlib.repr(value)
            state[name] = value
        return _rebuilt_error, (type(self), self.args, state)


def _rebuilt_error(cls: type[CasualLLMError], args: tuple[Any, ...],
                   state: dict[str, Any]) -> CasualLLMError:
    """An unpickled error: made without ``__init__``, its attributes restored."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ValidationError(CasualLLMError, TypeError, ValueError):
    """An argument has the wrong type or value; ``field`` and ``value`` say which.

    It is both a ``TypeError`` and a ``ValueError``, so ``except`` clauses written
    for either (or for pydantic's ``ValidationError``, a ``ValueError``) still work.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class ConfigurationError(CasualLLMError, ValueError):
    """A client or model cannot be set up as asked (a missing key, a bad URL)."""


class UnsupportedProviderError(ConfigurationError):
    """The provider name is not one casual_llm knows, or the provider lacks what was
    asked of it (Anthropic has no embeddings API)."""


class SchemaValidationError(CasualLLMError, ValueError):
    """A value (or a model's reply) does not conform to a JSON Schema.

    ``errors`` lists every failure as ``(json_path, message)``; ``raw_text`` is the
    model's reply when the value came from one.
    """

    def __init__(self, message: str, errors: list[tuple[str, str]] | None = None,
                 raw_text: str | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors or [])
        self.raw_text = raw_text


class ImageFetchError(CasualLLMError):
    """An image URL could not be fetched, or was refused as unsafe."""


class APIError(CasualLLMError):
    """A request to a provider failed; the base of every transport error.

    ``provider_message`` is the provider's own text, ``request_id`` its id for the
    request when it sent one.
    """

    status_code: int | None = None

    def __init__(self, message: str, *, provider_message: str | None = None,
                 request_id: str | None = None, body: Any = None,
                 error_type: str | None = None, error_code: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.provider_message = provider_message
        self.request_id = request_id
        self.body = body
        self.error_type = error_type
        self.error_code = error_code


class APIConnectionError(APIError, ConnectionError):
    """The provider could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """Connecting, or waiting for the next bytes, took longer than ``timeout``."""


class StreamError(APIError):
    """A stream broke: an error event, a frame that is not JSON, or an early end."""


class MaxTurnsExceededError(CasualLLMError):
    """``Model.run`` made ``max_turns`` model calls and the model still asks for tools.

    ``messages`` is the conversation so far (the last tool results included), so it can
    go on; ``turns`` is how many calls were made.
    """

    def __init__(self, message: str, *, messages: list[Any], turns: int) -> None:
        super().__init__(message)
        self.messages = messages
        self.turns = turns


class APIStatusError(APIError):
    """The provider answered with a non-2xx status.

    Carries ``status_code``, ``headers`` (the response's, lower-cased names) and
    ``retry_after`` (seconds, when the provider asked for a pause).
    """

    def __init__(self, message: str, *, status_code: int, headers: dict[str, str] | None = None,
                 retry_after: float | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.status_code = status_code
        self.headers = dict(headers or {})
        self.retry_after = retry_after


class BadRequestError(APIStatusError):
    """HTTP 400: the provider rejected the request."""


class AuthenticationError(APIStatusError):
    """HTTP 401: the API key is missing or wrong."""


class PermissionDeniedError(APIStatusError):
    """HTTP 403: the key may not use this model or feature."""


class NotFoundError(APIStatusError):
    """HTTP 404: unknown model or path."""


class ConflictError(APIStatusError):
    """HTTP 409."""


class RequestTooLargeError(APIStatusError):
    """HTTP 413: the request body is too large."""


class UnprocessableEntityError(APIStatusError):
    """HTTP 422."""


class RateLimitError(APIStatusError):
    """HTTP 429: slow down; ``retry_after`` says for how long when known."""


class InternalServerError(APIStatusError):
    """HTTP 5xx: the provider failed."""


class OverloadedError(InternalServerError):
    """HTTP 529 (Anthropic): the provider is overloaded."""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 409: ConflictError, 413: RequestTooLargeError,
    422: UnprocessableEntityError, 429: RateLimitError, 529: OverloadedError,
}


def _status_error_class(status: int) -> type[APIStatusError]:
    if status in _STATUS_ERRORS:
        return _STATUS_ERRORS[status]
    return InternalServerError if status >= 500 else APIStatusError


# === 2. Constants and small helpers ==========================================

OPENAI_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_BASE_URL = "https://api.anthropic.com"
OLLAMA_HOST = "http://localhost:11434"
ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; upstream's default
DEFAULT_TIMEOUT = 30.0  # image downloads
DEFAULT_REPLY_TIMEOUT = 600.0  # a non-streamed reply, with the clients' default timeout
_DEFAULT_CLIENT_TIMEOUT = 60.0
MAX_IMAGE_SIZE = 10 * 1024 * 1024
MAX_STREAM_EVENT_SIZE = 32 * 1024 * 1024  # bytes in one SSE event or NDJSON line
MAX_RESPONSE_SIZE = 64 * 1024 * 1024  # bytes in a reply that is not streamed
IMAGE_FETCH_DEADLINE = 60.0  # seconds for the whole download of one image, redirects included
MAX_PARALLEL_IMAGE_FETCHES = 8  # image downloads at once for one request
# Added where a provider needs the request itself to ask for JSON (OpenAI's JSON mode
# refuses a conversation that never mentions it; Anthropic has no JSON mode).
_JSON_INSTRUCTION = "You must respond with valid JSON only. No other text."
_USER_AGENT = f"casual-llm/{__version__} (Python {sys.version_info[0]}.{sys.version_info[1]})"



@dataclasses.dataclass(frozen=True)
class _ProviderFacts:
    """What casual_llm knows of a provider, declared once: its client reads the variables
    and the URL, the command line its help and errors, the transport which headers
    carry keys (never logged, never sent to another origin). The default URLs are the
    public constants above."""

    name: str           # the Provider value, and the command line's PROVIDER: prefix
    about: str          # for help texts
    key_env: str
    url_env: str
    key_headers: tuple[str, ...]
    default_model: str  # the command line's choice when -m names no model


_PROVIDERS: dict[str, _ProviderFacts] = {facts.name: facts for facts in (
    _ProviderFacts("openai", "OpenAI, or any OpenAI-compatible server", "OPENAI_API_KEY",
                   "OPENAI_BASE_URL", ("authorization", "openai-organization", "openai-project"),
                   "gpt-4o-mini"),
    _ProviderFacts("ollama", f"Ollama (default {OLLAMA_HOST})", "OLLAMA_API_KEY", "OLLAMA_HOST",
                   ("authorization",), "llama3.2"),
    _ProviderFacts("anthropic", "Anthropic", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL",
                   ("x-api-key", "authorization"), "claude-haiku-4-5"),
)}

_T = TypeVar("_T")
_R = TypeVar("_R", bound="_Record")


class _Secret(str):
    """A string (an API key, an auth header) whose repr never shows it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


def _mask(key: str | None) -> str:
    """Show enough of a key to recognise it, never enough to use it."""
    if not key:
        return "None"
    return f"'{key[:3]}...{key[-2:]}'" if len(key) > 12 else "'***'"


def _short(value: Any, limit: int = 80) -> str:
    """A repr cut to ``limit`` characters: errors and reprs never print a megabyte."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 20]}...({len(text)} chars)"


def _env(name: str) -> str | None:
    """An environment variable, with empty values counting as unset."""
    return os.environ.get(name) or None


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for dicts, ``obj.key`` for objects (SDK types): converters take both."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _fail(owner: str, field: str, expected: str, value: Any) -> NoReturn:
    raise ValidationError(f"{owner}.{field} must be {expected}, got {_short(value)}",
                          field=field, value=value)


def _check_str(owner: str, field: str, value: Any, *, optional: bool = False) -> None:
    if not (isinstance(value, str) or (optional and value is None)):
        _fail(owner, field, "a string or None" if optional else "a string", value)


def _check_literal(owner: str, field: str, value: Any, expected: str) -> None:
    if value != expected:
        _fail(owner, field, repr(expected), value)


def _check_text(owner: str, field: str, value: Any, *, optional: bool = False) -> None:
    """A string UTF-8 can carry: a lone surrogate (from ``surrogateescape`` or a JSON
    ``"\\ud800"``) would otherwise fail deep inside the request."""
    _check_str(owner, field, value, optional=optional)
    if value is not None and not value.isascii():
        _check_encodable(owner, field, value)


def _check_encodable(owner: str, field: str, value: str) -> None:
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValidationError(
            f"{owner}.{field} holds a lone surrogate {value[exc.start]!r} at index {exc.start}, "
            "which UTF-8 cannot encode; decode the text with errors='replace'",
            field=field, value=value) from None


def _check_number(owner: str, field: str, value: Any, *, optional: bool = True,
                  minimum: float | None = None, maximum: float | None = None) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        not isinstance(value, float) or math.isfinite(value))  # inf and NaN are no JSON
    if not ok or (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum):
        bounds = (f" from {minimum} to {maximum}" if minimum is not None and maximum is not None
                  else f" >= {minimum}" if minimum is not None else "")
        _fail(owner, field, f"a finite number{bounds}" + (" or None" if optional else ""), value)


def _check_int(owner: str, field: str, value: Any, *, optional: bool = True,
               minimum: int = 0) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(owner, field, f"an integer >= {minimum}" + (" or None" if optional else ""), value)


# A header value under one of these names is a secret: never shown, always scrubbed.
_SECRET_NAME = re.compile(r"auth|key|token|secret|passw|cookie|session|signature|credential",
                          re.IGNORECASE)
# http.client writes header values as Latin-1; a tab is the one control character allowed.
_BAD_HEADER_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 token
# Set by the transport from the body and the URL: a second value would desynchronise
# the framing (request smuggling) or send the request elsewhere.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "host", "connection",
                              "keep-alive", "te", "trailer", "upgrade", "proxy-connection"})


def _bad_char(text: str) -> str | None:
    """Where ``text`` holds a character no HTTP header can carry, described without it."""
    found = _BAD_HEADER_CHAR.search(text)
    if found is None:
        return None
    char = found.group()
    what = {"\n": "a line break", "\r": "a carriage return", "\x00": "a NUL byte"}.get(
        char, f"the control character U+{ord(char):04X}" if ord(char) < 256
        else f"the non-Latin-1 character U+{ord(char):04X}")
    return f"{what} at position {found.start()}"


def _credential(owner: str, param: str, value: str | None, env: str | None) -> str | None:
    """A key or token from ``param`` or ``env``, surrounding whitespace stripped (a ``.env``
    file's newline); one that still holds a character no header can carry is refused,
    naming where it came from but never the key."""
    source = f"{param}=" if value else env
    key = (value or (_env(env) if env else None) or "").strip() or None
    if key is not None and (where := _bad_char(key)) is not None:
        raise ConfigurationError(f"{owner}: the {param} from {source} holds {where}; a key "
                                 "is printable text: check for a stray or pasted character")
    return key


def _header_dict(owner: str, field: str, headers: Any) -> dict[str, str]:
    """User-set headers, each name a token and each value one line of Latin-1 (no CR, LF,
    NUL or folding), surrounding whitespace stripped; framing headers refused. Values
    under secret-looking names become secrets."""
    if headers is None:
        return {}
    if not (isinstance(headers, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
        _fail(owner, field, "a dict of str -> str", headers)
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ConfigurationError(f"{owner}: {field} has a header name that is not an HTTP "
                                     f"token: {_short(name)}")
        if name.lower() in _FRAMING_HEADERS:
            raise ConfigurationError(f"{owner}: {field} cannot set {name!r}: the transport "
                                     "sets it from the request")
        value = value.strip(" \t")
        if (where := _bad_char(value)) is not None:
            raise ConfigurationError(f"{owner}: {field}[{name!r}] holds {where}; a header "
                                     "value is one line of text")
        checked[name] = _Secret(value) if _SECRET_NAME.search(name) else value
    return checked


def _merge_headers(*layers: dict[str, str]) -> dict[str, str]:
    """Headers from each layer in turn, a later one replacing an earlier one of the same
    name in any case: two ``Authorization`` lines would reach the server otherwise."""
    merged: dict[str, tuple[str, str]] = {}
    for layer in layers:
        for name, value in layer.items():
            merged[name.lower()] = (name, value)
    return dict(merged.values())


def _secrets_in(headers: Mapping[str, str], url: str = "") -> set[str]:
    """Every secret a request carries: secret header values (with the token after their
    scheme word, and both halves of a Basic token), and the URL's credentials and
    secret-named query values."""
    import base64
    import binascii
    from urllib.parse import parse_qsl, unquote, urlsplit
    found: set[str] = set()
    for name, value in headers.items():
        if not (isinstance(value, _Secret) or _SECRET_NAME.search(name)):
            continue
        found.add(value)
        scheme, _, token = value.partition(" ")
        if token:
            found.add(token.strip())
        if scheme.lower() == "basic":
            try:
                found.update(base64.b64decode(token, validate=True).decode().split(":", 1))
            except (binascii.Error, UnicodeDecodeError):
                pass
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is not None:
        for item in (parts.username, parts.password):
            if item:
                found.update({item, unquote(item)})
        found.update(v for k, v in parse_qsl(parts.query) if _SECRET_NAME.search(k))
    return {secret for secret in found if secret.strip()}


def _scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret in ``secrets`` replaced by ``<redacted>``, longest first
    (a key inside its header value goes too); one shorter than 6 characters only as a
    whole word, or a 3-letter password would eat every word it is part of."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 6:
            text = text.replace(secret, "<redacted>")
        elif secret in text:
            text = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", "<redacted>", text)
    return text


_MAX_JSON_DEPTH = 256  # of a caller's extras; deeper is a mistake (or a cycle)


def _json_problem(value: Any, path: str = "") -> tuple[str, str, Any] | None:
    """Where ``value`` is not strict JSON (RFC 8259), as ``(path, what is wrong, the part)``;
    ``None`` when ``json.dumps`` sends it. Unchecked, NaN and infinities would go out as
    ``NaN``/``Infinity``, which providers refuse, and other types, lone surrogates or a cycle
    fail deep inside the request. Keys are as ``json.dumps`` takes them (``{50256: -100}``)."""
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError as exc:
                    return path, f"holds a lone surrogate {item[exc.start]!r}", item
        elif isinstance(item, float):
            if not math.isfinite(item):
                return path, f"is {item!r}, which JSON cannot carry", item
        elif isinstance(item, (dict, list, tuple)):
            if depth >= _MAX_JSON_DEPTH:
                return path, f"nests deeper than {_MAX_JSON_DEPTH} levels (or holds itself)", item
            if isinstance(item, dict):
                for key, part in item.items():
                    if not (key is None or isinstance(key, (str, int, float))):
                        return path, f"has the key {_short(key)}, which JSON cannot carry", key
                    stack.append((key, f"{path} (a key)", depth + 1))
                    stack.append((part, f"{path}[{key!r}]", depth + 1))
            else:
                stack.extend((part, f"{path}[{i}]", depth + 1) for i, part in enumerate(item))
        elif not (item is None or isinstance(item, int)):  # bool is an int
            return path, f"is {_short(item)}, which JSON cannot carry", item
    return None


def _check_extra(owner: str, field: str, extra: Any) -> dict[str, Any]:
    """Extras go into the request body as they are: a dict of string keys and JSON values."""
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        _fail(owner, field, "a dict with string keys", extra)
    for key, value in extra.items():
        problem = _json_problem(value, f"{field}[{key!r}]")
        if problem is not None:
            path, why, part = problem
            raise ValidationError(f"{owner}.{path} {why}; extras are sent as JSON, so give "
                                  "a finite number, a string, a list or a dict",
                                  field=key, value=part)
    return extra


# === 3. Content, messages, usage =============================================


class _Record:
    """Dict round trip and the pydantic-style names upstream users call."""

    __slots__ = ()
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()
    _never_dumped: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self, *, exclude_none: bool = False) -> dict[str, Any]:
        """This object as plain JSON-able dicts and lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self._never_dumped or (value is None and (
                    exclude_none or f.name in self._omit_if_none)):
                continue
            out[f.name] = _dump_value(value, exclude_none)
        return out

    @classmethod
    def from_dict(cls: type[_R], data: dict[str, Any] | _R) -> _R:
        """Build from a dict (unknown keys ignored), validating every field."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ValidationError(f"{cls.__name__}.from_dict needs a dict, got {_short(data)}",
                                  value=data)
        names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        given = {k: v for k, v in data.items() if k in names}
        required = _required_fields(cls)
        if not required.issubset(given):
            _missing(cls.__name__, required, given)
        return cls(**given)

    def model_dump(self, *, exclude_none: bool = False, **_ignored: Any) -> dict[str, Any]:
        """Pydantic-style alias of :meth:`to_dict`."""
        return self.to_dict(exclude_none=exclude_none)

    def model_dump_json(self, *, indent: int | None = None, exclude_none: bool = False,
                        **_ignored: Any) -> str:
        """This object as a JSON string."""
        return json.dumps(self.to_dict(exclude_none=exclude_none), indent=indent,
                          ensure_ascii=False)

    @classmethod
    def model_validate(cls: type[_R], obj: Any, **_ignored: Any) -> _R:
        """Pydantic-style alias of :meth:`from_dict`."""
        return cls.from_dict(obj)

    @classmethod
    def model_validate_json(cls: type[_R], data: str | bytes, **_ignored: Any) -> _R:
        """Build from a JSON string."""
        try:
            value = json.loads(data)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValidationError(f"{cls.__name__}.model_validate_json needs JSON text, got "
                                  f"{_short(data)}: {exc}", value=data) from None
        return cls.from_dict(value)

    def model_copy(self: _R, *, update: dict[str, Any] | None = None, deep: bool = False) -> _R:
        """A copy, with ``update`` applied (and validated)."""
        names = {f.name for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]
        if update is not None and not (isinstance(update, dict) and names.issuperset(update)):
            raise ValidationError(f"{type(self).__name__}.model_copy: update must be a dict of "
                                  f"its fields ({', '.join(sorted(names))}), got "
                                  f"{_short(update)}", field="update", value=update)
        if deep:
            import copy
            return dataclasses.replace(copy.deepcopy(self), **(update or {}))  # type: ignore[type-var]
        return dataclasses.replace(self, **(update or {}))  # type: ignore[type-var]


def _dump_value(value: Any, exclude_none: bool) -> Any:
    if isinstance(value, _Record):
        return value.to_dict(exclude_none=exclude_none)
    if isinstance(value, list):
        return [_dump_value(v, exclude_none) for v in value]
    if isinstance(value, dict):
        return {k: _dump_value(v, exclude_none) for k, v in value.items()}
    return value


def _ignore_unknown_keywords(cls: type[_T]) -> type[_T]:
    """Let the constructor drop keywords it does not know, as pydantic's models do
    (``extra="ignore"``): ``AssistantMessage(**openai_message)`` keeps working."""
    init = cls.__init__
    known = frozenset(f.name for f in dataclasses.fields(cls) if f.init)  # type: ignore[arg-type]
    required = _required_fields(cls)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if not known.issuperset(kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k in known}
        if required and not args and not required.issubset(kwargs):
            _missing(cls.__name__, required, kwargs)
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _required_fields(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls) if f.init
                     and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)


def _missing(owner: str, required: frozenset[str], given: Collection[str]) -> NoReturn:
    field = min(required.difference(given))
    raise ValidationError(f"{owner}.{field} is required but missing (given: "
                          f"{', '.join(sorted(given)) or 'nothing'})", field=field)


def _coerce(owner: str, field: str, value: Any, cls: type[_R]) -> _R:
    """A nested dict becomes ``cls``, as pydantic does."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value)
    _fail(owner, field, f"a {cls.__name__} or a dict", value)


def _check_iterable(owner: str, field: str, value: Any) -> None:
    if type(value) in (list, tuple):  # the usual case, without the slower ABC check
        return
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        _fail(owner, field, "a list", value)


def _coerce_list(owner: str, field: str, value: Any, item: Callable[[Any], _T]) -> list[_T]:
    if not isinstance(value, (list, tuple)):
        _fail(owner, field, "a list", value)
    return [item(v) for v in value]


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True)
class TextContent(_Record):
    """A piece of text inside a multimodal user message."""

    type: Literal["text"] = "text"
    text: str

    def __post_init__(self) -> None:
        _check_literal("TextContent", "type", self.type, "text")
        _check_text("TextContent", "text", self.text)


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True, repr=False)
class ImageContent(_Record):
    """An image: a URL, a ``data:`` URI, raw base64, or ``{"type": "base64", "data": ...}``.

    Build one from a file with :meth:`from_path` or from bytes with :meth:`from_bytes`.
    """

    type: Literal["image"] = "image"
    source: str | dict[str, str]
    media_type: str = "image/jpeg"

    def __post_init__(self) -> None:
        _check_literal("ImageContent", "type", self.type, "image")
        if isinstance(self.source, dict):
            if not all(isinstance(v, str) for v in self.source.values()):
                _fail("ImageContent", "source", "a dict of strings", self.source)
        elif not isinstance(self.source, str) or not self.source:
            _fail("ImageContent", "source", "a URL, a data: URI, base64 text or a dict",
                  self.source)
        _check_str("ImageContent", "media_type", self.media_type)
        if not self.media_type.startswith("image/"):
            _fail("ImageContent", "media_type", "an image/* media type", self.media_type)

    def __repr__(self) -> str:
        source: Any = self.source
        if isinstance(source, dict):
            source = {k: _ShortRepr(v) for k, v in source.items()}
        return (f"ImageContent(type='image', source={_short(source, 100)}, "
                f"media_type={self.media_type!r})")

    @classmethod
    def from_bytes(cls, data: bytes, media_type: str | None = None) -> ImageContent:
        """An image from raw bytes, its media type guessed from them when not given."""
        import base64
        if not isinstance(data, (bytes, bytearray, memoryview)):
            _fail("ImageContent", "data", "bytes (for a file, use from_path)", data)
        _check_str("ImageContent", "media_type", media_type, optional=True)
        b64 = base64.b64encode(data).decode("ascii")
        media = media_type or _sniff_media_type(b64) or "image/jpeg"
        return cls(source={"type": "base64", "data": b64}, media_type=media)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], media_type: str | None = None) -> ImageContent:
        """An image read from a local file."""
        # Not an int: open() takes a file descriptor too, and would close the caller's.
        if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
            _fail("ImageContent", "path", "a file path (str or pathlib.Path)", path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            raise ValidationError(f"cannot read the image {os.fspath(path)!r}: "
                                  f"{getattr(exc, 'strerror', None) or exc}",
                                  field="path", value=os.fspath(path)) from exc
        if media_type is None:
            import mimetypes
            guessed = mimetypes.guess_type(os.fspath(path))[0]
            media_type = _sniff_media_type_bytes(data) or guessed
            if not (media_type or "").startswith("image/"):
                raise ValidationError(f"{os.fspath(path)!r} is not an image (PNG, JPEG, GIF or "
                                      "WebP); pass media_type= to send it anyway",
                                      field="path", value=os.fspath(path))
        return cls.from_bytes(data, media_type)


class _ShortRepr(str):
    __slots__ = ()

    def __repr__(self) -> str:
        return _short(str(self), 60)


_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


def _sniff_media_type_bytes(data: bytes) -> str | None:
    """The image type from its first bytes (PNG, JPEG, GIF, WebP)."""
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _sniff_media_type(b64: str) -> str | None:
    import base64
    import binascii
    try:
        return _sniff_media_type_bytes(base64.b64decode(b64[:24]))
    except (binascii.Error, ValueError):
        return None


def _content_part(value: Any) -> TextContent | ImageContent:
    if isinstance(value, (TextContent, ImageContent)):
        return value
    if isinstance(value, dict):
        kind = value.get("type", "text")
        if kind == "text":
            return TextContent.from_dict(value)
        if kind == "image":
            return ImageContent.from_dict(value)
    _fail("UserMessage", "content", "text, None or a list of TextContent/ImageContent", value)


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True)
class UserMessage(_Record):
    """A message from the user: text, ``None``, or a list of text and image parts."""

    role: Literal["user"] = "user"
    content: str | list[TextContent | ImageContent] | None

    def __post_init__(self) -> None:
        _check_literal("UserMessage", "role", self.role, "user")
        if isinstance(self.content, str):
            _check_text("UserMessage", "content", self.content)
        elif self.content is not None:
            self.content = _coerce_list("UserMessage", "content", self.content, _content_part)


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True)
class SystemMessage(_Record):
    """Instructions for the model."""

    role: Literal["system"] = "system"
    content: str

    def __post_init__(self) -> None:
        _check_literal("SystemMessage", "role", self.role, "system")
        _check_text("SystemMessage", "content", self.content)


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True)
class AssistantToolCallFunction(_Record):
    """The function a tool call names, with its arguments as a JSON string."""

    name: str
    arguments: str

    def __post_init__(self) -> None:
        _check_str("AssistantToolCallFunction", "name", self.name)
        if not isinstance(self.arguments, str):
            _fail("AssistantToolCallFunction", "arguments",
                  "a JSON string (use json.dumps(...))", self.arguments)

    def parse_arguments(self) -> dict[str, Any]:
        """The arguments as a dict; ``{}`` when empty. Text that is not a JSON object raises
        ``ValidationError`` (a ``ValueError``)."""
        if not self.arguments.strip():
            return {}
        try:
            value = json.loads(self.arguments)
        except (ValueError, RecursionError) as exc:
            raise ValidationError(f"tool call {self.name!r} has arguments that are not JSON "
                                  f"({exc}): {_short(self.arguments)}", field="arguments",
                                  value=self.arguments) from exc
        if not isinstance(value, dict):
            raise ValidationError(f"tool call {self.name!r} has arguments that are not a JSON "
                                  f"object: {_short(value)}", field="arguments", value=value)
        return value


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True)
class AssistantToolCall(_Record):
    """A call the model asks the program to make."""

    id: str
    type: Literal["function"] = "function"
    function: AssistantToolCallFunction

    def __post_init__(self) -> None:
        _check_str("AssistantToolCall", "id", self.id)
        _check_literal("AssistantToolCall", "type", self.type, "function")
        self.function = _coerce("AssistantToolCall", "function", self.function,
                                AssistantToolCallFunction)


def _tool_call(value: Any) -> AssistantToolCall:
    return _coerce("AssistantMessage", "tool_calls", value, AssistantToolCall)


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True)
class AssistantMessage(_Record):
    """The model's reply.

    ``finish_reason`` (why it stopped: ``stop``, ``length``, ``tool_calls``,
    ``content_filter``) and ``parsed`` (the reply built as the requested
    ``response_format`` type) are filled by the clients and ``Model``.
    ``reasoning`` is the model's readable thinking, when it shows it;
    ``reasoning_state`` is what the provider needs back to continue (Anthropic's
    signed thinking blocks, OpenRouter's ``reasoning_details``): keep the message
    in the conversation and it is sent back as the provider requires, to that
    provider only.
    """

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"finish_reason", "reasoning",
                                                         "reasoning_state"})
    _never_dumped: ClassVar[frozenset[str]] = frozenset({"parsed"})

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    finish_reason: str | None = None
    parsed: Any = dataclasses.field(default=None, compare=False)
    reasoning: str | None = None
    reasoning_state: dict[str, Any] | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_literal("AssistantMessage", "role", self.role, "assistant")
        _check_str("AssistantMessage", "content", self.content, optional=True)
        if self.tool_calls is not None:
            self.tool_calls = _coerce_list("AssistantMessage", "tool_calls", self.tool_calls,
                                           _tool_call)
        _check_str("AssistantMessage", "finish_reason", self.finish_reason, optional=True)
        _check_str("AssistantMessage", "reasoning", self.reasoning, optional=True)
        if self.reasoning_state is not None and not (
                isinstance(self.reasoning_state, dict)
                and isinstance(self.reasoning_state.get("provider"), str)):
            _fail("AssistantMessage", "reasoning_state",
                  "a dict with a 'provider' (as a reply made it) or None", self.reasoning_state)


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True)
class ToolResultMessage(_Record):
    """The result of a tool call, sent back to the model; ``is_error`` marks a failed
    call (Anthropic's ``is_error``; the other wires carry it in the text)."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"is_error"})

    role: Literal["tool"] = "tool"
    name: str
    tool_call_id: str
    content: str
    is_error: bool | None = None

    def __post_init__(self) -> None:
        _check_literal("ToolResultMessage", "role", self.role, "tool")
        for field in ("name", "tool_call_id", "content"):
            _check_text("ToolResultMessage", field, getattr(self, field))
        if self.is_error is not None and not isinstance(self.is_error, bool):
            _fail("ToolResultMessage", "is_error", "True, False or None", self.is_error)


def _arguments_object(function: AssistantToolCallFunction) -> dict[str, Any]:
    """Arguments as the JSON object Anthropic and Ollama want.

    Models sometimes write arguments that are not a JSON object; the Anthropic and
    Ollama converters then send ``{}`` and log a warning, so one bad call does not
    sink the conversation. OpenAI's wire form is the string itself, sent untouched.
    """
    try:
        return function.parse_arguments()
    except ValueError:
        logger.warning("tool call %r has arguments that are not a JSON object; sending {}",
                       function.name)
        return {}


# Thinking that local servers leave in the content (llama.cpp with --reasoning-format
# none, several LM Studio models; Magistral writes [THINK]).
_THINK_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"),
               ("<thought>", "</thought>"), ("<reasoning>", "</reasoning>"),
               ("[THINK]", "[/THINK]"))


def _split_think(text: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a reply that starts with a think block, ``(None, text)``
    of one that does not. A reply whose ``<think>`` the chat template wrote into the
    prompt starts inside the block: only its closing tag is in the reply."""
    head = text.lstrip()
    for opening, closing in _THINK_TAGS:
        if head.startswith(opening):
            end = head.find(closing, len(opening))
            if end < 0:  # cut off while thinking
                return head[len(opening):].strip(), ""
            return head[len(opening):end].strip(), head[end + len(closing):].lstrip()
    end = text.find("</think>")
    if end >= 0 and "<think>" not in text[:end]:
        return text[:end].strip(), text[end + len("</think>"):].lstrip()
    return None, text


ChatMessage = AssistantMessage | SystemMessage | ToolResultMessage | UserMessage

_MESSAGE_CLASSES: dict[str, type[Any]] = {
    "assistant": AssistantMessage, "system": SystemMessage,
    "tool": ToolResultMessage, "user": UserMessage,
}


def message_from_dict(data: dict[str, Any] | ChatMessage) -> ChatMessage:
    """Rebuild any message from its dict (as ``to_dict`` made it), chosen by ``role``."""
    if isinstance(data, (AssistantMessage, SystemMessage, ToolResultMessage, UserMessage)):
        return data
    role = data.get("role") if isinstance(data, dict) else None
    cls = _MESSAGE_CLASSES.get(role) if isinstance(role, str) else None
    if cls is None:
        raise ValidationError(f"message role must be one of {sorted(_MESSAGE_CLASSES)}, "
                              f"got {_short(role)}", field="role", value=role)
    message: ChatMessage = cls.from_dict(data)
    return message


def _check_messages(messages: Any) -> list[ChatMessage]:
    """Messages as a list of message objects (dicts accepted), checked once per call."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise ValidationError(f"messages must be a list of messages, got {_short(messages)}",
                              field="messages", value=messages)
    return [message_from_dict(m) for m in messages]


def merge_system_messages(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Upstream 0.8's ``system_message_handling="merge"``: system messages stripped, the
    empty ones dropped and, when more than one is left, joined by a blank line into one
    system message at the front."""
    return _merge_system(_check_messages(messages))


def _merge_system(checked: list[ChatMessage]) -> list[ChatMessage]:
    texts = [m.content.strip() for m in checked if isinstance(m, SystemMessage)]
    kept = [t for t in texts if t]
    if len(kept) > 1:
        return [SystemMessage(content="\n\n".join(kept)),
                *(m for m in checked if not isinstance(m, SystemMessage))]
    return [SystemMessage(content=m.content.strip()) if isinstance(m, SystemMessage) else m
            for m in checked if not (isinstance(m, SystemMessage) and not m.content.strip())]


def _to_int(owner: str, field: str, value: Any) -> int:
    """Token counts: ``"3"`` and ``3.0`` become 3 (pydantic's lax mode); bad values fail."""
    if isinstance(value, bool):
        _fail(owner, field, "an integer >= 0", value)
    if (isinstance(value, float) and value.is_integer()) or (
            isinstance(value, str) and value.strip().isdecimal() and len(value) < 100):
        value = int(value)
    if not isinstance(value, int) or value < 0:
        _fail(owner, field, "an integer >= 0", value)
    return value


_USAGE_DETAILS = ("cached_tokens", "cache_write_tokens", "reasoning_tokens")


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True, repr=False)
class Usage(_Record):
    """Tokens a call used. ``total_tokens`` is their sum; usages add up with ``+``.

    ``prompt_tokens`` counts the whole prompt, cached parts included. Where the
    provider reports them, ``cached_tokens`` (read from the prompt cache),
    ``cache_write_tokens`` (written to it) and ``reasoning_tokens`` (thinking, a
    part of ``completion_tokens``) say more; ``None`` means not reported.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None

    def __post_init__(self) -> None:
        self.prompt_tokens = _to_int("Usage", "prompt_tokens", self.prompt_tokens)
        self.completion_tokens = _to_int("Usage", "completion_tokens", self.completion_tokens)
        if (self.cached_tokens, self.cache_write_tokens, self.reasoning_tokens) != (
                None, None, None):
            for name in _USAGE_DETAILS:
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, _to_int("Usage", name, value))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "total_tokens")
        return f"Usage({shown})"

    @property
    def total_tokens(self) -> int:
        """``prompt_tokens + completion_tokens``."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self, *, exclude_none: bool = False) -> dict[str, Any]:
        """The counts and their total; the details only when reported."""
        out = {"prompt_tokens": self.prompt_tokens,
               "completion_tokens": self.completion_tokens,
               "total_tokens": self.total_tokens}
        for name in _USAGE_DETAILS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        details = [None if a is None and b is None else (a or 0) + (b or 0)
                   for a, b in ((getattr(self, n), getattr(other, n)) for n in _USAGE_DETAILS)]
        return _usage(self.prompt_tokens + other.prompt_tokens,
                      self.completion_tokens + other.completion_tokens, *details)


def _usage(prompt: Any, completion: Any, cached: Any = None, cache_write: Any = None,
           reasoning: Any = None) -> Usage:
    """Usage from a provider's counts; a missing (``null``) count is 0, not a crash."""
    if cached is None and cache_write is None and reasoning is None:
        return Usage(prompt_tokens=prompt or 0, completion_tokens=completion or 0)
    return Usage(prompt_tokens=prompt or 0, completion_tokens=completion or 0,
                 cached_tokens=cached, cache_write_tokens=cache_write,
                 reasoning_tokens=reasoning)


@_ignore_unknown_keywords
@dataclasses.dataclass(kw_only=True, slots=True)
class StreamChunk(_Record):
    """A piece of a streamed reply.

    A chunk carries text in ``content`` or thinking in ``reasoning`` (its
    ``content`` then ``""``), in the order they arrive. The final chunk carries
    ``finish_reason``, any ``tool_calls`` (assembled from their fragments),
    ``usage`` and ``message``: the whole reply, the thing to append to the
    conversation; its ``content`` may be ``""``.
    """

    _omit_if_none: ClassVar[frozenset[str]] = frozenset({"tool_calls", "usage", "reasoning",
                                                         "message"})

    content: str
    finish_reason: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    usage: Usage | None = None
    reasoning: str | None = None
    message: AssistantMessage | None = None

    def __post_init__(self) -> None:
        _check_str("StreamChunk", "content", self.content)
        _check_str("StreamChunk", "finish_reason", self.finish_reason, optional=True)
        if self.tool_calls is not None:
            self.tool_calls = _coerce_list("StreamChunk", "tool_calls", self.tool_calls,
                                           _tool_call)
        if self.usage is not None:
            self.usage = _coerce("StreamChunk", "usage", self.usage, Usage)
        _check_str("StreamChunk", "reasoning", self.reasoning, optional=True)
        if self.message is not None:
            self.message = _coerce("StreamChunk", "message", self.message, AssistantMessage)


def _chunk(content: str, finish_reason: str | None = None,
           tool_calls: list[AssistantToolCall] | None = None,
           usage: Usage | None = None, reasoning: str | None = None,
           message: AssistantMessage | None = None) -> StreamChunk:
    """A chunk from values the clients already checked; skips validation (hot path)."""
    chunk = object.__new__(StreamChunk)
    chunk.content = content
    chunk.finish_reason = finish_reason
    chunk.tool_calls = tool_calls
    chunk.usage = usage
    chunk.reasoning = reasoning
    chunk.message = message
    return chunk


class ModelName(str):
    """A model name a server reports (``list_models()``): a plain ``str`` that also
    keeps the provider's own record of the model in ``details``."""

    details: dict[str, Any]

    def __new__(cls, name: str, details: dict[str, Any] | None = None) -> ModelName:
        self = super().__new__(cls, name)
        self.details = dict(details or {})
        return self


# === 4. Tools and schemas from Python types ==================================

# Schemas from Python types: used by Tool.from_function here and by structured
# output (section 5), which validates against them.

_NoneType = type(None)


def _json_class(value: Any) -> type | None:
    """The JSON class of a value whose class is a subclass (bool before int: True is no number)."""
    for cls in (bool, int, float, str, dict, list):
        if isinstance(value, cls):
            return cls
    return _NoneType if value is None else None


def _json_type_name(values: Sequence[Any]) -> str | None:
    """The one JSON type shared by all values, or None when they are mixed."""
    classes = {_json_class(v) for v in values}
    if classes == {bool}:
        return "boolean"
    if classes == {str}:
        return "string"
    if classes == {int}:
        return "integer"
    if classes and classes <= {int, float}:
        return "number"
    if classes == {_NoneType}:
        return "null"
    return None


_UnionType = type(int | str)
_PRIMITIVE_SCHEMAS = {str: "string", int: "integer", float: "number", bool: "boolean"}
_SEQUENCE_ORIGINS = (list, collections.abc.Sequence, collections.abc.MutableSequence,
                     collections.abc.Iterable, collections.abc.Collection)
_MAPPING_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_TYPEDDICT_QUALIFIERS = tuple(q for q in (getattr(typing, "Required", None),
                                          getattr(typing, "NotRequired", None)) if q is not None)


def _is_class(tp: Any) -> typing.TypeGuard[type]:
    # On 3.9-3.10 isinstance(list[int], type) is True, yet issubclass() rejects it.
    return isinstance(tp, type) and typing.get_origin(tp) is None


def _is_enum(tp: Any) -> bool:
    return _is_class(tp) and issubclass(tp, enum.Enum)


def _is_named_type(tp: Any) -> bool:
    """Types that get their own ``$defs`` entry: dataclasses, TypedDicts and Enums."""
    return _is_class(tp) and (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)
                              or issubclass(tp, enum.Enum))


def _user_doc(cls: type) -> str | None:
    """The docstring the user wrote, skipping ones dataclasses and Enum generate."""
    doc = cls.__dict__.get("__doc__")
    if not isinstance(doc, str) or not doc.strip():
        return None
    if dataclasses.is_dataclass(cls) and doc.startswith(cls.__name__ + "(") and doc.endswith(")"):
        return None     # dataclasses fills in "Point(x: int, y: int)" when there is no docstring
    if _is_enum(cls) and doc in ("An enumeration.", enum.Enum.__doc__):
        return None
    return inspect.cleandoc(doc)


@functools.lru_cache(maxsize=256)
def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a class, ``Annotated`` kept (string annotations evaluated)."""
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception as exc:    # NameError for unknown names, TypeError for bad expressions
        raise TypeError(f"cannot resolve the type annotations of {cls.__qualname__}: {exc}; "
                        "types referenced by string must be importable from its module") from exc


def _json_default(value: Any) -> tuple[bool, Any]:
    """``(True, json_value)`` when a field default can be written into a schema."""
    if value is None or (isinstance(value, (str, bool, int)) and not isinstance(value, enum.Enum)):
        return True, value
    if isinstance(value, float):
        return math.isfinite(value), value
    if isinstance(value, enum.Enum):
        return _json_default(value.value)
    if isinstance(value, (list, tuple)):
        pairs = [_json_default(v) for v in value]
        return all(ok for ok, _ in pairs), [v for _, v in pairs]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        entries = {k: _json_default(v) for k, v in value.items()}
        return all(ok for ok, _ in entries.values()), {k: v for k, (_, v) in entries.items()}
    return False, None


def _literal_value(value: Any, where: str) -> Any:
    plain = value.value if isinstance(value, enum.Enum) else value
    if not (plain is None or isinstance(plain, (str, int, float))):
        raise TypeError(f"cannot build a JSON Schema for {where}: Literal value {value!r} is not "
                        "a JSON scalar")
    return plain


class _TypeSchemaBuilder:
    """Builds the JSON Schema of one Python type; nested named types go to ``$defs`` (or are
    inlined when ``inline``), and the root type refers to itself as ``#``."""

    def __init__(self, root: Any, inline: bool) -> None:
        self.root, self.inline = root, inline
        self.defs: dict[str, dict[str, Any]] = {}
        self.names: dict[Any, str] = {}
        self.building: list[Any] = []

    def build(self) -> dict[str, Any]:
        where = f"type {getattr(self.root, '__qualname__', self.root)!r}"
        if _is_named_type(self.root):
            self.building.append(self.root)
            schema = self.named_body(self.root)
        else:
            schema = self.schema(self.root, where)
        if self.defs:
            schema["$defs"] = self.defs
        return schema

    def schema(self, tp: Any, where: str) -> dict[str, Any]:
        """The schema of ``tp``; ``where`` names the field for error messages."""
        if isinstance(tp, (str, typing.ForwardRef)):
            raise TypeError(f"cannot build a JSON Schema for {where}: unresolved forward "
                            f"reference {tp!r}")
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Annotated:
            schema = self.schema(args[0], where)
            notes = [a for a in tp.__metadata__ if isinstance(a, str)]
            if notes:
                schema["description"] = notes[0]
            return schema
        if hasattr(tp, "__supertype__"):        # typing.NewType
            return self.schema(tp.__supertype__, where)
        if tp is Any:
            return {}
        if tp is None or tp is _NoneType:
            return {"type": "null"}
        if _is_class(tp) and tp in _PRIMITIVE_SCHEMAS:
            return {"type": _PRIMITIVE_SCHEMAS[tp]}
        if _is_named_type(tp):
            return self.named_ref(tp, where)
        if origin is typing.Literal:
            values = [_literal_value(v, where) for v in args]
            schema = {"const": values[0]} if len(values) == 1 else {"enum": values}
            kind = _json_type_name(values)
            return {"type": kind, **schema} if kind else schema
        if origin is typing.Union or origin is _UnionType:
            return {"anyOf": [self.schema(a, where) for a in args]}
        return self.container(tp, origin, args, where)

    def container(self, tp: Any, origin: Any, args: tuple[Any, ...], where: str) -> dict[str, Any]:
        base = origin or tp
        if base is tuple:      # typing.Tuple, bare or subscripted, has the origin tuple
            if not args or (len(args) == 2 and args[1] is Ellipsis):
                items = {"items": self.schema(args[0], where)} if args else {}
                return {"type": "array", **items}
            if args == ((),):
                return {"type": "array", "maxItems": 0}
            return {"type": "array", "prefixItems": [self.schema(a, where) for a in args],
                    "minItems": len(args), "maxItems": len(args)}
        if base in (set, frozenset, collections.abc.Set, collections.abc.MutableSet):
            items = {"items": self.schema(args[0], where)} if args else {}
            return {"type": "array", **items, "uniqueItems": True}
        if base in _SEQUENCE_ORIGINS and base is not str:
            return {"type": "array", **({"items": self.schema(args[0], where)} if args else {})}
        if base in _MAPPING_ORIGINS:
            if args and args[0] is not str:
                raise TypeError(f"cannot build a JSON Schema for {where}: mapping keys must be "
                                f"str (JSON object keys), not {args[0]!r}")
            return {"type": "object",
                    **({"additionalProperties": self.schema(args[1], where)} if args else {})}
        raise TypeError(f"cannot build a JSON Schema for {where}: unsupported type {tp!r} "
                        "(supported: str, int, float, bool, None, Any, list, tuple, set, dict, "
                        "Literal, Optional/Union, Annotated, Enum, dataclass, TypedDict)")

    def named_ref(self, tp: type, where: str) -> dict[str, Any]:
        if self.inline:
            if tp in self.building:
                raise TypeError(f"cannot inline the JSON Schema of {tp.__qualname__} ({where}): "
                                "the type is recursive; use $defs (inline=False)")
            self.building.append(tp)
            try:
                return self.named_body(tp)
            finally:
                self.building.pop()
        if tp is self.root:
            return {"$ref": "#"}
        name = self.names.get(tp)
        if name is None:
            name, n = tp.__name__, 2
            while name in self.defs:    # two classes of one name from different modules
                name, n = f"{tp.__name__}{n}", n + 1
            self.names[tp] = name
            self.defs[name] = {}        # reserved first: a recursive field refers to it
            self.defs[name] = self.named_body(tp)
        return {"$ref": f"#/$defs/{name}"}

    def named_body(self, tp: type) -> dict[str, Any]:
        if issubclass(tp, enum.Enum):
            schema = self.enum_body(tp)
        elif typing.is_typeddict(tp):
            schema = self.typeddict_body(tp)
        else:
            schema = self.dataclass_body(tp)
        doc = _user_doc(tp)
        head = {"title": tp.__name__, **({"description": doc} if doc else {})}
        if "type" in schema:
            head = {"type": schema.pop("type"), **head}
        return {**head, **schema}

    def enum_body(self, tp: type[enum.Enum]) -> dict[str, Any]:
        values = [_literal_value(m, f"enum {tp.__qualname__}") for m in tp]
        kind = _json_type_name(values)
        return {"type": kind, "enum": values} if kind else {"enum": values}

    def dataclass_body(self, tp: type) -> dict[str, Any]:
        hints = _type_hints(tp)
        properties, required = {}, []
        for field in dataclasses.fields(tp):
            if not field.init:
                continue
            where = f"field {field.name!r} of {tp.__qualname__}"
            schema = self.schema(hints.get(field.name, field.type), where)
            description = field.metadata.get("description") if field.metadata else None
            if isinstance(description, str):
                schema["description"] = description
            if (field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING):
                required.append(field.name)
            elif field.default is not dataclasses.MISSING:
                ok, value = _json_default(field.default)
                if ok:
                    schema["default"] = value
            properties[field.name] = schema
        return {"type": "object", "properties": properties, "required": required,
                "additionalProperties": False}

    def typeddict_body(self, tp: Any) -> dict[str, Any]:
        properties, required = {}, []
        for name, hint in _type_hints(tp).items():
            # __required_keys__ misses Required/NotRequired written as strings (PEP 563), so the
            # resolved hint has the last word.
            bare = hint
            while typing.get_origin(bare) is typing.Annotated:  # Annotated[NotRequired[X], ...]
                bare = typing.get_args(bare)[0]
            qualifier = typing.get_origin(bare)
            if qualifier in _TYPEDDICT_QUALIFIERS:
                is_required = qualifier is getattr(typing, "Required", None)
            else:
                is_required = name in tp.__required_keys__
            properties[name] = self.schema(_strip_qualifiers(hint),
                                           f"key {name!r} of {tp.__qualname__}")
            if is_required:
                required.append(name)
        return {"type": "object", "properties": properties, "required": required,
                "additionalProperties": False}


def _copy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=256)
def _cached_type_schema(tp: Any, inline: bool) -> dict[str, Any]:
    return _TypeSchemaBuilder(tp, inline).build()


def _schema_from_type(tp: Any, inline: bool = False) -> dict[str, Any]:
    """A fresh JSON Schema (draft 2020-12) for a Python type; ``inline`` inlines nested types
    instead of using ``$defs`` (for tool parameters) and rejects recursive types."""
    if _hashable(tp):
        schema: dict[str, Any] = _copy_json(_cached_type_schema(tp, inline))
        return schema
    return _TypeSchemaBuilder(tp, inline).build()


def _strip_qualifiers(hint: Any) -> Any:
    """A TypedDict hint without Required/NotRequired, inside Annotated too."""
    if typing.get_origin(hint) is typing.Annotated:
        inner = _strip_qualifiers(typing.get_args(hint)[0])
        params = (inner, *hint.__metadata__)
        return typing.Annotated[params]
    while typing.get_origin(hint) in _TYPEDDICT_QUALIFIERS:
        hint = typing.get_args(hint)[0]
    return hint


_PARAMETER_KEYS = ("type", "description", "enum", "items", "properties", "required",
                   "default", "anyOf", "oneOf")


@dataclasses.dataclass(init=False, eq=True)
class ToolParameter(_Record):
    """One JSON-Schema property of a tool; unknown schema keys are kept (``model_extra``)."""

    type: str | list[str] | None = None
    description: str | None = None
    enum: list[Any] | None = None
    items: dict[str, Any] | None = None
    properties: dict[str, ToolParameter] | None = None
    required: list[str] | None = None
    default: Any = None
    anyOf: list[dict[str, Any]] | None = None
    oneOf: list[dict[str, Any]] | None = None
    model_extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __init__(self, type: str | list[str] | None = None, description: str | None = None,
                 enum: list[Any] | None = None, items: dict[str, Any] | None = None,
                 properties: dict[str, Any] | None = None, required: list[str] | None = None,
                 default: Any = None, anyOf: list[dict[str, Any]] | None = None,
                 oneOf: list[dict[str, Any]] | None = None, **extra: Any) -> None:
        owner = "ToolParameter"
        if not (type is None or isinstance(type, str) or (
                isinstance(type, list) and all(isinstance(t, str) for t in type))):
            _fail(owner, "type", "a JSON-Schema type name or a list of them", type)
        _check_text(owner, "description", description, optional=True)
        for name, value in (("enum", enum), ("required", required), ("anyOf", anyOf),
                            ("oneOf", oneOf)):
            if value is not None and not isinstance(value, list):
                _fail(owner, name, "a list or None", value)
        if isinstance(items, ToolParameter):
            items = items.to_schema()
        if items is not None and not isinstance(items, dict):
            _fail(owner, "items", "a dict or None", items)
        if properties is not None:
            if not isinstance(properties, dict):
                _fail(owner, "properties", "a dict of ToolParameter or None", properties)
            properties = {k: _coerce(owner, f"properties[{k!r}]", v, ToolParameter)
                          for k, v in properties.items()}
        self.type, self.description, self.enum, self.items = type, description, enum, items
        self.properties, self.required, self.default = properties, required, default
        self.anyOf, self.oneOf, self.model_extra = anyOf, oneOf, dict(extra)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | ToolParameter) -> ToolParameter:
        """Build from a JSON-Schema dict, keeping every key."""
        if isinstance(data, ToolParameter):
            return data
        if not isinstance(data, dict):
            raise ValidationError(f"ToolParameter needs a dict, got {_short(data)}", value=data)
        if not all(isinstance(k, str) for k in data):
            _fail("ToolParameter", "keys", "strings (it is a JSON Schema)", data)
        return cls(**data)

    def to_schema(self) -> dict[str, Any]:
        """The JSON Schema, ``None`` values left out at every level (upstream's dump)."""
        out: dict[str, Any] = {}
        for key in _PARAMETER_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            if key == "properties":
                value = {k: p.to_schema() for k, p in value.items()}
            out[key] = _drop_none(value)
        for key, value in self.model_extra.items():
            if value is not None:
                out[key] = _drop_none(value)
        return out

    def to_dict(self, *, exclude_none: bool = True) -> dict[str, Any]:
        """Same as :meth:`to_schema`."""
        return self.to_schema()


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _parameter(value: Any) -> ToolParameter:
    return _coerce("Tool", "parameters", value, ToolParameter)


@dataclasses.dataclass(kw_only=True)
class Tool(_Record):
    """A function the model may call, described by a JSON Schema of its parameters.

    Build one by hand, from an MCP-style schema (:meth:`from_input_schema`), or from
    a plain Python function (:meth:`from_function`).
    """

    name: str
    description: str
    parameters: dict[str, ToolParameter] = dataclasses.field(default_factory=dict)
    required: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        _check_text("Tool", "name", self.name)
        if not self.name:
            _fail("Tool", "name", "a non-empty string", self.name)
        _check_text("Tool", "description", self.description)
        if not isinstance(self.parameters, dict):
            _fail("Tool", "parameters", "a dict of name -> ToolParameter", self.parameters)
        self.parameters = {k: _parameter(v) for k, v in self.parameters.items()}
        if not isinstance(self.required, (list, tuple)) or not all(
                isinstance(r, str) for r in self.required):
            _fail("Tool", "required", "a list of parameter names", self.required)
        self.required = list(self.required)

    @property
    def input_schema(self) -> dict[str, Any]:
        """The parameters as one JSON-Schema object (what MCP calls ``inputSchema``)."""
        return {"type": "object",
                "properties": {k: p.to_schema() for k, p in self.parameters.items()},
                "required": list(self.required)}

    def to_dict(self, *, exclude_none: bool = False) -> dict[str, Any]:
        """Name, description and the parameter schemas."""
        return {"name": self.name, "description": self.description,
                "parameters": {k: p.to_schema() for k, p in self.parameters.items()},
                "required": list(self.required)}

    @classmethod
    def from_input_schema(cls, name: str, description: str,
                          input_schema: dict[str, Any]) -> Tool:
        """A tool from a JSON-Schema object (an MCP tool's ``inputSchema``)."""
        if not isinstance(input_schema, dict):
            _fail("Tool", "input_schema", "a JSON-Schema dict", input_schema)
        # Checked by Tool: list("abc") would be three required names.
        return cls(name=name, description=description,
                   parameters=input_schema.get("properties", {}),
                   required=input_schema.get("required", []))

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *, name: str | None = None,
                      description: str | None = None) -> Tool:
        """A tool from a function's name, signature, type hints and docstring.

        Parameter descriptions come from the docstring's Google (``Args:``), NumPy
        (``Parameters``) or reST (``:param x:``) section; parameters without a
        default are required.
        """
        if not callable(fn):
            raise ValidationError(f"Tool.from_function needs a function, got {_short(fn)}",
                                  field="fn", value=fn)
        _check_text("Tool.from_function", "name", name, optional=True)
        _check_text("Tool.from_function", "description", description, optional=True)
        # A partial is its function's tool; a callable object's hints are its __call__'s.
        target = fn.func if isinstance(fn, functools.partial) else fn
        label = getattr(target, "__name__", None) or type(fn).__name__
        try:
            signature = inspect.signature(fn)
            hints = typing.get_type_hints(target if inspect.isroutine(target)
                                          or inspect.isclass(target) else type(target).__call__,
                                          include_extras=True)
        except Exception as exc:  # no signature (ValueError), unresolvable hints (NameError...)
            raise ValidationError(f"Tool.from_function({label}): cannot read its signature and "
                                  f"type hints: {type(exc).__name__}: {exc}; give it a plain "
                                  "def with importable annotations", field="fn",
                                  value=fn) from exc
        summary, param_docs = _parse_docstring(inspect.getdoc(target) or "")
        parameters: dict[str, ToolParameter] = {}
        required: list[str] = []
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or (
                    param.name in ("self", "cls") and param.annotation is param.empty):
                continue
            try:
                schema = (_schema_from_type(hints[param.name], inline=True)
                          if param.name in hints else {})
            except TypeError as exc:
                raise ValidationError(f"Tool.from_function({label}): parameter "
                                      f"{param.name!r}: {exc}", field=param.name) from exc
            schema = dict(schema)
            schema.pop("title", None)
            if param.name in param_docs and "description" not in schema:
                schema["description"] = param_docs[param.name]
            if param.default is param.empty:
                required.append(param.name)
            elif param.default is not None and _json_default(param.default)[0]:
                schema["default"] = _json_default(param.default)[1]
            parameters[param.name] = ToolParameter.from_dict(schema)
        return cls(name=name or label, description=description or summary,
                   parameters=parameters, required=required)


@functools.lru_cache(maxsize=1)
def _doc_patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """Section headers, reST ``:param`` lines and Google/NumPy entries (compiled on first use)."""
    return (re.compile(r"^(Args|Arguments|Parameters|Params|Returns?|Raises|Yields|"
                       r"Examples?|Notes?|See Also|Attributes)\s*:?\s*$"),
            re.compile(r":param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)"),
            re.compile(r"(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*(?::\s*(.*))?$"))


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Summary and per-parameter text from a Google, NumPy or reST docstring.

    Google: ``Args:`` then ``name (type): text``; NumPy: ``Parameters`` over a dashed
    line, then ``name : type`` with the text indented below; reST: ``:param name: text``.
    """
    section_header, rest_param, param_entry = _doc_patterns()
    lines = doc.expandtabs().splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    entry_indent: int | None = None
    numpy = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        rest = rest_param.match(stripped)
        if rest:
            section, current = "rest", rest.group(1)
            params[current] = rest.group(2).strip()
            continue
        if stripped.startswith(":"):
            section, current = "other", None
            continue
        underline = i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        header = section_header.match(stripped)
        if header and (stripped.endswith(":") or underline):
            section = "params" if header.group(1).startswith(("Arg", "Param")) else "other"
            current, entry_indent, numpy = None, None, underline
            continue
        if not stripped or set(stripped) == {"-"}:
            if section is None:
                summary.append("")
            continue
        entry = param_entry.match(stripped)
        if section is None:
            summary.append(stripped)
        elif section == "params" and entry and (entry_indent is None or indent <= entry_indent):
            entry_indent, current = indent, entry.group(1).lstrip("*")
            params[current] = "" if numpy else (entry.group(2) or "").strip()
        elif section in ("params", "rest") and current:
            params[current] = f"{params[current]} {stripped}".strip()
    paragraph = "\n".join(summary).strip().split("\n\n")[0]
    return " ".join(paragraph.split()), params


# === 5. Structured output ====================================================

# Five parts, each using only those above it:
#   5a. JSON paths and JSON equality        (shared by everything below)
#   5b. ECMA-262 patterns                   (JSON Schema "pattern" is ECMA, not Python)
#   5c. the JSON Schema validator           (draft 2020-12, compiled into closures)
#   5d. a validated value into a Python type (schemas from types: section 4)
#   5e. response_format resolution, root wrapping, OpenAI strict subset

# --- 5a. JSON paths and JSON equality ----------------------------------------

# Bounds every recursive walk (validation, annotation collection, schema compilation) well below
# CPython's default recursion limit of 1000: a node costs about two frames.
_MAX_DEPTH = 256
_JSON_CLASSES = (bool, int, float, str, dict, list, _NoneType)

# Where a value sits, as a linked list built from the root down: None at the root, then
# (parent path, key) pairs; rendered as text only when an error surfaces.
_Path = tuple["_Path", str | int] | None


def _render_keys(keys: Iterable[Any]) -> str:
    """Keys from the root down to a value, as ``$.a.b[3]["odd key"]``."""
    out = ["$"]
    for key in keys:
        if isinstance(key, int) and not isinstance(key, bool):
            out.append(f"[{key}]")
        elif isinstance(key, str) and key.isidentifier():
            out.append("." + key)
        else:
            out.append("[" + json.dumps(str(key), ensure_ascii=False) + "]")
    return "".join(out)


def _render_path(path: _Path) -> str:
    """Render a validator path: nested ``(parent, key)`` pairs, built only as cheap tuples."""
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    keys.reverse()
    return _render_keys(keys)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 31] + "…" + text[-30:]


def _show(value: Any) -> str:
    """A value as JSON text, truncated, for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return _shorten(text)


def _json_key(value: Any) -> Any:
    """A hashable key equal for JSON-equal values: 1 and 1.0 match, True and 1 do not."""
    cls = value.__class__
    if cls is str or cls is int or cls is float or value is None:
        return value
    if cls is bool:
        return (bool, value)
    if cls is list:
        return ("l", *map(_json_key, value))
    if cls is dict:
        return ("d", frozenset((k, _json_key(v)) for k, v in value.items()))
    cls = _json_class(value)
    if cls is None:
        return ("?", repr(value))
    # str() of a str-mixin Enum member is "Color.RED"; str.__str__ gives the underlying text.
    return _json_key(str.__str__(value) if cls is str else cls(value))


def _schema_error(where: str, message: str) -> SchemaValidationError:
    """A malformed-schema error; ``where`` is the JSON pointer of the bad keyword."""
    return SchemaValidationError(f"invalid JSON Schema at {_shorten(where)}: {message}")


# --- 5b. ECMA-262 patterns ---------------------------------------------------
#
# JSON Schema patterns are ECMA-262 regular expressions. Compiled with re.ASCII, Python's
# \d \w \b already mean what ECMA means (ASCII only); the translation below covers the rest:
# \s (ECMA: Unicode spaces), "." and "$" (ECMA: no newline leniency), \p{...} property escapes,
# named groups, \u{...}, \cX, and the empty classes [] and [^].

_ECMA_SPACE = ("\\t\\n\\x0b\\x0c\\r \\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029"
               "\\u202f\\u205f\\u3000\\ufeff")
_GENERAL_CATEGORY_ALIASES = {
    "letter": "L", "cased_letter": "LC", "uppercase_letter": "Lu", "lowercase_letter": "Ll",
    "titlecase_letter": "Lt", "modifier_letter": "Lm", "other_letter": "Lo", "mark": "M",
    "combining_mark": "M", "nonspacing_mark": "Mn", "spacing_mark": "Mc", "enclosing_mark": "Me",
    "number": "N", "decimal_number": "Nd", "digit": "Nd", "letter_number": "Nl",
    "other_number": "No", "punctuation": "P", "punct": "P", "connector_punctuation": "Pc",
    "dash_punctuation": "Pd", "open_punctuation": "Ps", "close_punctuation": "Pe",
    "initial_punctuation": "Pi", "final_punctuation": "Pf", "other_punctuation": "Po",
    "symbol": "S", "math_symbol": "Sm", "currency_symbol": "Sc", "modifier_symbol": "Sk",
    "other_symbol": "So", "separator": "Z", "space_separator": "Zs", "line_separator": "Zl",
    "paragraph_separator": "Zp", "other": "C", "control": "Cc", "cntrl": "Cc", "format": "Cf",
    "surrogate": "Cs", "private_use": "Co", "unassigned": "Cn",
}


@functools.lru_cache(maxsize=1)
def _unicode_category_ranges() -> dict[str, list[tuple[int, int]]]:
    """Code point ranges per general category, built once on first use of \\p{...} (~0.1 s)."""
    import unicodedata
    category = unicodedata.category
    ranges: dict[str, list[tuple[int, int]]] = {}
    previous, start = None, 0
    for code in range(sys.maxunicode + 1):
        current = category(chr(code))
        if current != previous:
            if previous is not None:
                ranges.setdefault(previous, []).append((start, code - 1))
            previous, start = current, code
    assert previous is not None     # the loop above saw at least one code point
    ranges.setdefault(previous, []).append((start, sys.maxunicode))
    return ranges


@functools.lru_cache(maxsize=64)
def _unicode_property_class(name: str) -> str:
    """The body of a character class (no brackets) for an ECMA ``\\p{name}`` escape."""
    key = name.split("=", 1)[1] if name.startswith(("General_Category=", "gc=")) else name
    if key in ("Any", "ASCII"):
        return "\\x00-\\U0010ffff" if key == "Any" else "\\x00-\\x7f"
    category = _GENERAL_CATEGORY_ALIASES.get(key.lower(), key)
    table = _unicode_category_ranges()
    if category == "LC":
        wanted = ["Lu", "Ll", "Lt"]
    elif len(category) == 1:
        wanted = [c for c in table if c[0] == category]
    else:
        wanted = [category] if category in table else []
    if not wanted:
        raise ValueError(f"unsupported Unicode property escape \\p{{{name}}}")
    return "".join(f"\\U{a:08x}-\\U{b:08x}" for c in wanted for a, b in table[c])


def _ecma_escape(pattern: str, i: int, in_class: bool) -> tuple[str, int]:
    """Translate the escape starting at pattern[i] (a backslash); returns (python, next index)."""
    if i + 1 >= len(pattern):
        raise ValueError("pattern ends with a lone backslash")
    e = pattern[i + 1]
    if e in "pP" and pattern.startswith("{", i + 2):
        end = pattern.find("}", i + 3)
        if end < 0:
            raise ValueError("unterminated \\p{...} escape")
        body = _unicode_property_class(pattern[i + 3:end])
        if e == "P" and in_class:
            raise ValueError("\\P{...} inside a character class is not supported")
        text = body if in_class else ("[" if e == "p" else "[^") + body + "]"
        return text, end + 1
    if e == "s":
        return (_ECMA_SPACE if in_class else f"[{_ECMA_SPACE}]"), i + 2
    if e == "S" and not in_class:
        return f"[^{_ECMA_SPACE}]", i + 2
    if e == "u" and pattern.startswith("{", i + 2):
        end = pattern.find("}", i + 3)
        return f"\\U{int(pattern[i + 3:end], 16):08x}", end + 1
    if e == "c" and i + 2 < len(pattern) and pattern[i + 2].isalpha():
        return f"\\x{ord(pattern[i + 2]) % 32:02x}", i + 3
    if e == "k" and pattern.startswith("<", i + 2):
        end = pattern.find(">", i + 3)
        return f"(?P={pattern[i + 3:end]})", end + 1
    return pattern[i:i + 2], i + 2


def _ecma_to_python(pattern: str) -> str:
    """Rewrite an ECMA-262 pattern as an equivalent Python pattern (to compile with re.ASCII)."""
    out, i, n, in_class = [], 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == "\\":
            text, i = _ecma_escape(pattern, i, in_class)
            out.append(text)
            continue
        if in_class:
            # Python warns on "[[" and "&&"-style set operations; ECMA means the characters.
            out.append("\\" + c if c in "[&~|" else c)
            in_class = c != "]"
        elif c == "[":
            if pattern.startswith("[]", i) or pattern.startswith("[^]", i):
                empty = pattern.startswith("[]", i)
                out.append("(?!)" if empty else "(?s:.)")
                i += 2 if empty else 3
                continue
            negated = pattern.startswith("[^", i)
            out.append("[^" if negated else "[")
            i += 2 if negated else 1
            in_class = True
            continue
        elif c == ".":
            out.append("[^\\n\\r\\u2028\\u2029]")
        elif c == "$":
            out.append("\\Z")
        elif (c == "(" and pattern.startswith("(?<", i)
              and not pattern.startswith(("(?<=", "(?<!"), i)):
            out.append("(?P<")
            i += 3
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=512)
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """Compile an ECMA-262 pattern; raises ValueError naming the pattern when unsupported."""
    try:
        return re.compile(_ecma_to_python(pattern), re.ASCII)
    except (re.error, ValueError, OverflowError) as exc:
        raise ValueError(f"cannot compile pattern {pattern!r}: {exc}") from exc


# --- 5c. The JSON Schema validator -------------------------------------------
#
# A schema is compiled once into closures. Every compiled node has the signature
# ``node(instance, path, errors, depth)``: it appends ``(path, message)`` to ``errors`` for every
# failure, where ``path`` is a linked ``(parent, key)`` tuple rendered only if an error surfaces.
# Keyword checks are grouped by the instance's JSON class, so a string never runs object checks.

_TYPE_CLASSES = {
    "null": (_NoneType,), "boolean": (bool,), "integer": (int,), "number": (int, float),
    "string": (str,), "array": (list,), "object": (dict,),
}
_KIND_CLASSES = {"number": (int, float), "string": (str,), "array": (list,), "object": (dict,)}
_Errors = list[tuple[_Path, str]]
_Node = Callable[[Any, _Path, _Errors, int], None]


def _accept(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
    """The ``true`` schema."""


def _reject(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
    """The ``false`` schema."""
    errs.append((path, "no value is allowed here (the schema is false)"))


def _too_deep(path: _Path) -> NoReturn:
    raise SchemaValidationError(
        f"validation nests deeper than {_MAX_DEPTH} levels at {_shorten(_render_path(path))}: "
        "the value is too deeply nested or the schema recurses without consuming the value",
        [(_shorten(_render_path(path)), "nesting too deep")])


def _is_valid(node: _Node, inst: Any, depth: int) -> bool:
    errs: _Errors = []
    node(inst, None, errs, depth)
    return not errs


def _ptr(where: str, *keys: Any) -> str:
    for key in keys:
        where += "/" + str(key).replace("~", "~0").replace("/", "~1")
    return where


def _percent_decode(text: str) -> str:
    if "%" not in text:
        return text
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode())
    return raw.decode("utf-8", "replace")


class _Checks:
    """Keyword checks of one schema node, sorted by the JSON class they apply to."""

    __slots__ = ("by_class", "common")

    def __init__(self) -> None:
        self.common: list[_Node] = []
        # Keyed by class; looked up with None too (a value that is no JSON value at all).
        self.by_class: dict[type | None, list[_Node]] = {cls: [] for cls in _JSON_CLASSES}

    def add(self, kind: str | None, check: _Node) -> None:
        if kind is None:
            self.common.append(check)
        else:
            for cls in _KIND_CLASSES[kind]:
                self.by_class[cls].append(check)


class _SchemaCompiler:
    """Compiles one schema document (the root of every local ``$ref``) into a validator node."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self._nodes: dict[int, _Node] = {}
        self._refs: dict[str, Any] = {}
        self._level = 0

    def compile(self, schema: Any, where: str = "#") -> _Node:
        """The node for ``schema``; memoised by identity so recursive ``$ref`` cycles terminate."""
        if schema is True:
            return _accept
        if schema is False:
            return _reject
        if not isinstance(schema, dict):
            raise _schema_error(where,
                                f"a schema must be an object or a boolean, not {_show(schema)}")
        cached = self._nodes.get(id(schema))
        if cached is not None:
            return cached
        if self._level >= _MAX_DEPTH:
            raise _schema_error(where, f"schema nests deeper than {_MAX_DEPTH} levels")
        checks = _Checks()
        common, by_class = checks.common, checks.by_class

        def node(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
            if depth > _MAX_DEPTH:
                _too_deep(path)
            for check in common:
                check(inst, path, errs, depth)
            group: Sequence[_Node] | None = by_class.get(inst.__class__)
            if group is None:
                group = by_class.get(_json_class(inst), ())
            for check in group:
                check(inst, path, errs, depth)

        self._nodes[id(schema)] = node
        self._level += 1
        try:
            for builder in _KEYWORD_BUILDERS:
                builder(self, schema, where, checks)
        finally:
            self._level -= 1
        return node

    def resolve(self, ref: Any, where: str) -> Any:
        """The subschema a local ``$ref`` (``#`` plus a JSON pointer) points to."""
        if not isinstance(ref, str):
            raise _schema_error(where, f"$ref must be a string, not {_show(ref)}")
        if ref in self._refs:
            return self._refs[ref]
        if not ref.startswith("#"):
            raise _schema_error(where, f"$ref {ref!r} is not supported: only local references "
                                       "('#' or '#/json/pointer') are")
        pointer = _percent_decode(ref[1:])
        if pointer and not pointer.startswith("/"):
            raise _schema_error(where, f"$ref {ref!r} is not supported: anchors are not, "
                                       "use a JSON pointer such as '#/$defs/Name'")
        target = self.root
        for token in pointer.split("/")[1:] if pointer else ():
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and token in target:
                target = target[token]
            elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            else:
                raise _schema_error(where, f"$ref {ref!r} points to nothing: no {token!r} there")
        self._refs[ref] = target
        return target

    def evaluated(self, schema: Any, inst: Any, depth: int,
                  own: Callable[[_SchemaCompiler, dict[str, Any], Any], set[Any]],
                  own_key: str, nested: bool) -> set[Any]:
        """Property names or item indices that ``schema`` and its passing in-place subschemas
        evaluated: the annotations that unevaluatedProperties / unevaluatedItems consult."""
        if depth > _MAX_DEPTH:
            _too_deep(None)
        if not isinstance(schema, dict):
            return set()
        seen = own(self, schema, inst)
        if nested and own_key in schema:
            seen.update(inst if isinstance(inst, dict) else range(len(inst)))
        subs = [*schema.get("allOf", ()), *schema.get("anyOf", ()), *schema.get("oneOf", ())]
        if "$ref" in schema:
            subs.append(self.resolve(schema["$ref"], "#"))
        if "if" in schema:
            if _is_valid(self.compile(schema["if"]), inst, depth + 1):
                subs += [schema["if"], schema.get("then", True)]
            else:
                subs.append(schema.get("else", True))
        if isinstance(inst, dict):
            subs += [s for k, s in schema.get("dependentSchemas", {}).items() if k in inst]
        for sub in subs:
            if _is_valid(self.compile(sub), inst, depth + 1):
                seen |= self.evaluated(sub, inst, depth + 1, own, own_key, True)
        return seen


def _own_evaluated_properties(compiler: _SchemaCompiler, schema: dict[str, Any],
                              inst: dict[str, Any]) -> set[str]:
    if "additionalProperties" in schema:
        return set(inst)    # additionalProperties evaluates every name the others left over
    properties = schema.get("properties", {})
    seen = {k for k in inst if k in properties}
    for pattern in schema.get("patternProperties", {}):
        search = _ecma_regex(pattern).search
        seen.update(k for k in inst if search(k))
    return seen


def _own_evaluated_items(compiler: _SchemaCompiler, schema: dict[str, Any],
                         inst: list[Any]) -> set[int]:
    if "items" in schema:
        return set(range(len(inst)))
    seen = set(range(min(len(schema.get("prefixItems", ())), len(inst))))
    if "contains" in schema:
        node = compiler.compile(schema["contains"])
        seen.update(i for i, item in enumerate(inst) if _is_valid(node, item, 0))
    return seen


# Keyword builders: each reads the keywords it owns from a schema and adds checks.

def _number_keyword(schema: dict[str, Any], key: str, where: str) -> int | float:
    value = schema[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise _schema_error(_ptr(where, key), f"{key} must be a finite number, not "
                                              f"{_show(value)}")
    return value


def _count_keyword(schema: dict[str, Any], key: str, where: str) -> int:
    value = schema[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _schema_error(_ptr(where, key),
                            f"{key} must be a non-negative integer, not {_show(value)}")
    return value


def _schema_list(schema: dict[str, Any], key: str, where: str) -> list[Any]:
    value = schema[key]
    if not isinstance(value, list) or not value:
        raise _schema_error(_ptr(where, key), f"{key} must be a non-empty array of schemas")
    return value


def _schema_map(schema: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = schema[key]
    if not isinstance(value, dict):
        raise _schema_error(_ptr(where, key), f"{key} must be an object, not {_show(value)}")
    return value


def _build_type(c: _SchemaCompiler, schema: dict[str, Any], where: str, out: _Checks) -> None:
    if "type" not in schema:
        return
    names = schema["type"]
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(n in _TYPE_CLASSES for n in names):
        raise _schema_error(_ptr(where, "type"), f"type must be one of {sorted(_TYPE_CLASSES)} "
                                                 f"or a list of them, not {_show(schema['type'])}")
    allowed = frozenset(cls for n in names for cls in _TYPE_CLASSES[n])
    integral_floats = "integer" in names and "number" not in names
    expected = " or ".join(repr(n) for n in names)

    def check_type(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
        cls = inst.__class__
        if cls in allowed:
            if cls is not float or inst - inst == 0.0:  # NaN and infinities are no JSON numbers
                return
            errs.append((path, f"{_show(inst)} is not a JSON number (NaN and infinities are not)"))
            return
        if cls not in _JSON_CLASSES:
            cls = _json_class(inst)
            if cls in allowed:
                return
        if cls is float and integral_floats and inst.is_integer():
            return
        errs.append((path, f"{_show(inst)} is not of type {expected}"))

    out.add(None, check_type)


def _build_enum_const(c: _SchemaCompiler, schema: dict[str, Any], where: str, out: _Checks) -> None:
    for key in ("enum", "const"):
        if key not in schema:
            continue
        values = schema[key] if key == "enum" else [schema[key]]
        if not isinstance(values, list):
            raise _schema_error(_ptr(where, key), f"enum must be an array, not {_show(values)}")
        strings = frozenset(v for v in values if v.__class__ is str)
        others = frozenset(_json_key(v) for v in values if v.__class__ is not str)
        message = (f"is not one of {_show(values)}" if key == "enum"
                   else f"is not {_show(values[0])}")

        def check_enum(inst: Any, path: _Path, errs: _Errors, depth: int,
                       strings: frozenset[Any] = strings, others: frozenset[Any] = others,
                       message: str = message) -> None:
            key = inst if inst.__class__ is str else _json_key(inst)
            if key in (strings if key.__class__ is str else others):
                return
            errs.append((path, f"{_show(inst)} {message}"))

        out.add(None, check_enum)


def _build_in_place(c: _SchemaCompiler, schema: dict[str, Any], where: str, out: _Checks) -> None:
    """allOf, anyOf, oneOf, not, if/then/else and $ref: subschemas applied to the same value."""
    if "$ref" in schema:
        target = c.compile(c.resolve(schema["$ref"], _ptr(where, "$ref")), schema["$ref"])

        def check_ref(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
            target(inst, path, errs, depth + 1)

        out.add(None, check_ref)
    for key, combine in (("allOf", _all_of), ("anyOf", _any_of), ("oneOf", _one_of)):
        if key in schema:
            subs = _schema_list(schema, key, where)
            out.add(None, combine([c.compile(s, _ptr(where, key, i)) for i, s in enumerate(subs)]))
    if "not" in schema:
        negated = c.compile(schema["not"], _ptr(where, "not"))

        def check_not(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
            if _is_valid(negated, inst, depth + 1):
                errs.append((path, f"{_show(inst)} must not match the 'not' schema"))

        out.add(None, check_not)
    if "if" in schema and ("then" in schema or "else" in schema):
        test = c.compile(schema["if"], _ptr(where, "if"))
        then = c.compile(schema.get("then", True), _ptr(where, "then"))
        other = c.compile(schema.get("else", True), _ptr(where, "else"))

        def check_if(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
            branch = then if _is_valid(test, inst, depth + 1) else other
            branch(inst, path, errs, depth + 1)

        out.add(None, check_if)


def _path_length(path: _Path) -> int:
    length = 0
    while path is not None:
        path, length = path[0], length + 1
    return length


def _closest_failure(failures: list[_Errors]) -> _Errors:
    """The alternative that got furthest into the value: its errors explain the mismatch best."""
    return max(failures, key=lambda errs: max(_path_length(p) for p, _ in errs))


def _all_of(subs: list[_Node]) -> _Node:
    def check_all_of(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
        for sub in subs:
            sub(inst, path, errs, depth + 1)

    return check_all_of


def _any_of(subs: list[_Node]) -> _Node:
    def check_any_of(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
        failures = []
        for sub in subs:
            branch: _Errors = []
            sub(inst, path, branch, depth + 1)
            if not branch:
                return
            failures.append(branch)
        errs.append((path, (f"{_show(inst)} does not match any of the {len(subs)} "
                            "alternatives (anyOf)")))
        errs.extend(_closest_failure(failures))

    return check_any_of


def _one_of(subs: list[_Node]) -> _Node:
    def check_one_of(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
        failures, passed = [], []
        for index, sub in enumerate(subs):
            branch: _Errors = []
            sub(inst, path, branch, depth + 1)
            if branch:
                failures.append(branch)
            else:
                passed.append(index)
        if not passed:
            errs.append((path, (f"{_show(inst)} does not match any of the {len(subs)} "
                                "alternatives (oneOf)")))
            errs.extend(_closest_failure(failures))
        elif len(passed) > 1:
            errs.append((path,
                         f"{_show(inst)} matches more than one alternative (oneOf: {passed})"))

    return check_one_of


# Written as "not within", so NaN (no JSON number, every comparison false) fails each bound.
_BOUNDS = (
    ("minimum", "is less than the minimum", lambda x, limit: not x >= limit),
    ("exclusiveMinimum", "is not greater than the exclusive minimum",
     lambda x, limit: not x > limit),
    ("maximum", "is greater than the maximum", lambda x, limit: not x <= limit),
    ("exclusiveMaximum", "is not less than the exclusive maximum", lambda x, limit: not x < limit),
)


def _build_number(c: _SchemaCompiler, schema: dict[str, Any], where: str, out: _Checks) -> None:
    for key, complaint, fails in _BOUNDS:
        if key not in schema:
            continue
        limit = _number_keyword(schema, key, where)

        def check_bound(inst: Any, path: _Path, errs: _Errors, depth: int, limit: Any = limit,
                        fails: Any = fails, complaint: str = complaint) -> None:
            if fails(inst, limit):
                errs.append((path, f"{_show(inst)} {complaint} {_show(limit)}"))

        out.add("number", check_bound)
    if "multipleOf" in schema:
        divisor = _number_keyword(schema, "multipleOf", where)
        if divisor <= 0:
            raise _schema_error(_ptr(where, "multipleOf"),
                                f"multipleOf must be > 0, not {divisor!r}")

        def check_multiple(inst: Any, path: _Path, errs: _Errors, depth: int) -> None:
            if not _is_multiple(inst, divisor):
                errs.append((path, f"{_show(inst)} is not a multiple of {_show(divisor)}"))

        out.add("number", check_multiple)


def _is_multiple(value: float, divisor: float) -> bool:
    """Exact test on the numbers as written in JSON (0.0075 is a multiple of 0.0001, although
    the binary floats are not): with value = a/b and divisor = p/q, a*q must be a multiple
    of b*p, in integers, so a 1000-digit value neither overflows nor loses precision."""
    if isinstance(value, int) and isinstance(divisor, int):
        return value % divisor == 0
    if isinstance(value, float) and not math.isfinite(value):  # math.isfinite(10**400) overflows
        return False
    import decimal  # only floats need it, and most schemas have no multipleOf
    (a, b), (p, q) = ((n, 1) if isinstance(n, int) else
                      decimal.Decimal(repr(float(n))).as_integer_ratio() for n in (value, divisor))
    return (a * q) % (b * p) == 0


def _build_string(c: _SchemaCompiler, schema: dict[str, Any], where: str, out: _Checks) -> None:
    if "minLength" in schema:
        low = _count_keyword(schema, "minLength", where)

        def check_min_length(inst: str, path: _Path, errs: _Errors, depth: int) -> None:
            if len(inst) < low:
                errs.append((path, f"{_show(inst)} is shorter than {low} characters"))

        out.add("string", check_min_length)
    if "maxLength" in schema:
        high = _count_keyword(schema, "maxLength", where)

        def check_max_length(inst: str, path: _Path, errs: _Errors, depth: int) -> None:
            if len(inst) > high:
                errs.append((path, f"{_show(inst)} is longer than {high} characters"))

        out.add("string", check_max_length)
    if "pattern" in schema:
        pattern = schema["pattern"]
        try:
            search = _ecma_regex(pattern).search if isinstance(pattern, str) else None
        except ValueError as exc:
            raise _schema_error(_ptr(where, "pattern"), str(exc)) from exc
        if search is None:
            raise _schema_error(_ptr(where, "pattern"),
                                f"pattern must be a string, not {_show(pattern)}")

        def check_pattern(inst: str, path: _Path, errs: _Errors, depth: int) -> None:
            if search(inst) is None:
                errs.append((path, f"{_show(inst)} does not match pattern {pattern!r}"))

        out.add("string", check_pattern)


def _build_items(c: _SchemaCompiler, schema: dict[str, Any], where: str, out: _Checks) -> None:
    prefix_key, rest_key = "prefixItems", "items"
    if isinstance(schema.get("items"), list) and "prefixItems" not in schema:
        prefix_key, rest_key = "items", "additionalItems"     # draft 2019 and older tuple form
    prefix = [c.compile(s, _ptr(where, prefix_key, i))
              for i, s in enumerate(_schema_list(schema, prefix_key, where))
              ] if prefix_key in schema else []
    rest = c.compile(schema[rest_key], _ptr(where, rest_key)) if rest_key in schema else None
    if not prefix and rest in (None, _accept):
        return
    start = len(prefix)

    def check_items(inst: list[Any], path: _Path, errs: _Errors, depth: int) -> None:
        depth += 1
        for index, (sub, item) in enumerate(zip(prefix, inst, strict=False)):
            sub(item, (path, index), errs, depth)
        if rest is _reject and len(inst) > start:
            errs.append((path, f"array has {len(inst)} items, at most {start} are allowed"))
        elif rest is not None:
            for index in range(start, len(inst)):
                rest(inst[index], (path, index), errs, depth)

    out.add("array", check_items)


def _build_array(c: _SchemaCompiler, schema: dict[str, Any], where: str, out: _Checks) -> None:
    for key, too, compare in (("minItems", "fewer", int.__lt__), ("maxItems", "more", int.__gt__)):
        if key in schema:
            limit = _count_keyword(schema, key, where)

            def check_count(inst: list[Any], path: _Path, errs: _Errors, depth: int,
                            limit: int = limit, too: str = too, compare: Any = compare) -> None:
                if compare(len(inst), limit):
                    errs.append((path, f"array has {len(inst)} items, {too} than {limit}"))

            out.add("array", check_count)
    if schema.get("uniqueItems") is True:
        out.add("array", _check_unique)
    if "contains" in schema:
        wanted = c.compile(schema["contains"], _ptr(where, "contains"))
        low = _count_keyword(schema, "minContains", where) if "minContains" in schema else 1
        high = _count_keyword(schema, "maxContains", where) if "maxContains" in schema else None

        def check_contains(inst: list[Any], path: _Path, errs: _Errors, depth: int) -> None:
            found = sum(1 for item in inst if _is_valid(wanted, item, depth + 1))
            if found < low:
                errs.append((path, (f"array has {found} items matching 'contains', "
                                    f"at least {low} are required")))
            if high is not None and found > high:
                errs.append((path, (f"array has {found} items matching 'contains', "
                                    f"at most {high} are allowed")))

        out.add("array", check_contains)


def _check_unique(inst: list[Any], path: _Path, errs: _Errors, depth: int) -> None:
    seen: dict[Any, int] = {}
    for index, item in enumerate(inst):
        first = seen.setdefault(_json_key(item), index)
        if first != index:
            errs.append((path, (f"array items {first} and {index} are equal ({_show(item)}); "
                                "items must be unique")))
            return


def _build_properties(c: _SchemaCompiler, schema: dict[str, Any], where: str, out: _Checks) -> None:
    """properties, patternProperties and additionalProperties, checked in one pass."""
    props = {k: c.compile(s, _ptr(where, "properties", k))
             for k, s in _schema_map(schema, "properties", where).items()
             } if "properties" in schema else {}
    patterns: list[tuple[Callable[[str], Any], _Node]] = []
    for pattern, sub in (_schema_map(schema, "patternProperties", where).items()
                         if "patternProperties" in schema else ()):
        try:
            if not isinstance(pattern, str):
                raise ValueError(f"a pattern must be a string, not {pattern!r}")
            search = _ecma_regex(pattern).search
        except ValueError as exc:
            raise _schema_error(_ptr(where, "patternProperties"), str(exc)) from exc
        patterns.append((search, c.compile(sub, _ptr(where, "patternProperties", pattern))))
    extra = schema.get("additionalProperties", True)
    extra = c.compile(extra, _ptr(where, "additionalProperties")) if extra is not True else None
    if patterns or (extra is not None and extra is not _reject):
        out.add("object", _general_properties(props, patterns, extra))
    elif extra is _reject:
        out.add("object", _closed_properties(props))
    elif props:
        items = tuple(props.items())

        def check_properties(inst: dict[str, Any], path: _Path, errs: _Errors, depth: int) -> None:
            depth += 1
            for name, sub in items:
                if name in inst:
                    sub(inst[name], (path, name), errs, depth)

        out.add("object", check_properties)


def _closed_properties(props: dict[str, _Node]) -> _Node:
    def check_closed(inst: dict[str, Any], path: _Path, errs: _Errors, depth: int) -> None:
        depth += 1
        for name, value in inst.items():
            sub = props.get(name)
            if sub is None:
                errs.append((path, f"additional property {name!r} is not allowed"))
            else:
                sub(value, (path, name), errs, depth)

    return check_closed


def _general_properties(props: dict[str, _Node],
                        patterns: list[tuple[Callable[[str], Any], _Node]],
                        extra: _Node | None) -> _Node:
    def check_general(inst: dict[str, Any], path: _Path, errs: _Errors, depth: int) -> None:
        depth += 1
        for name, value in inst.items():
            sub = props.get(name)
            matched = sub is not None
            if sub is not None:
                sub(value, (path, name), errs, depth)
            for search, pattern_sub in patterns:
                if search(name):
                    matched = True
                    pattern_sub(value, (path, name), errs, depth)
            if not matched and extra is not None:
                if extra is _reject:
                    errs.append((path, f"additional property {name!r} is not allowed"))
                else:
                    extra(value, (path, name), errs, depth)

    return check_general


def _build_object(c: _SchemaCompiler, schema: dict[str, Any], where: str, out: _Checks) -> None:
    if "required" in schema:
        required = schema["required"]
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _schema_error(_ptr(where, "required"),
                                f"required must be an array of strings, not {_show(required)}")
        if required:
            def check_required(inst: dict[str, Any], path: _Path, errs: _Errors,
                               depth: int) -> None:
                for name in required:
                    if name not in inst:
                        errs.append((path, f"missing required property {name!r}"))

            out.add("object", check_required)
    if "dependentRequired" in schema:
        dependent = _schema_map(schema, "dependentRequired", where)
        if not all(isinstance(v, list) and all(isinstance(n, str) for n in v)
                   for v in dependent.values()):
            raise _schema_error(_ptr(where, "dependentRequired"),
                                "each value must be an array of strings")

        def check_dependent(inst: dict[str, Any], path: _Path, errs: _Errors, depth: int) -> None:
            for trigger, names in dependent.items():
                if trigger in inst:
                    for name in names:
                        if name not in inst:
                            errs.append((path, (f"property {name!r} is required when "
                                                f"{trigger!r} is present")))

        out.add("object", check_dependent)
    if "dependentSchemas" in schema:
        dependent_subs = [(k, c.compile(s, _ptr(where, "dependentSchemas", k)))
                          for k, s in _schema_map(schema, "dependentSchemas", where).items()]

        def check_dependent_schemas(inst: dict[str, Any], path: _Path, errs: _Errors,
                                    depth: int) -> None:
            for trigger, sub in dependent_subs:
                if trigger in inst:
                    sub(inst, path, errs, depth + 1)

        out.add("object", check_dependent_schemas)
    if "propertyNames" in schema:
        names_node = c.compile(schema["propertyNames"], _ptr(where, "propertyNames"))

        def check_names(inst: dict[str, Any], path: _Path, errs: _Errors, depth: int) -> None:
            for name in inst:
                problems: _Errors = []
                names_node(name, None, problems, depth + 1)
                if problems:
                    errs.append((path, f"property name {name!r} is invalid: {problems[0][1]}"))

        out.add("object", check_names)
    for key, too, compare in (("minProperties", "fewer", int.__lt__),
                              ("maxProperties", "more", int.__gt__)):
        if key in schema:
            limit = _count_keyword(schema, key, where)

            def check_size(inst: dict[str, Any], path: _Path, errs: _Errors, depth: int,
                           limit: int = limit, too: str = too, compare: Any = compare) -> None:
                if compare(len(inst), limit):
                    errs.append((path, f"object has {len(inst)} properties, {too} than {limit}"))

            out.add("object", check_size)


def _build_unevaluated(c: _SchemaCompiler, schema: dict[str, Any], where: str,
                       out: _Checks) -> None:
    for key, kind, own in (("unevaluatedProperties", "object", _own_evaluated_properties),
                           ("unevaluatedItems", "array", _own_evaluated_items)):
        if key not in schema:
            continue
        sub = c.compile(schema[key], _ptr(where, key))
        if sub is _accept:
            continue

        def check_unevaluated(inst: Any, path: _Path, errs: _Errors, depth: int, key: str = key,
                              own: Any = own, sub: Any = sub) -> None:
            seen = c.evaluated(schema, inst, depth, own, key, False)
            pairs = inst.items() if isinstance(inst, dict) else enumerate(inst)
            for name, value in pairs:
                if name in seen:
                    continue
                if sub is _reject:
                    errs.append((path, (f"{'property' if isinstance(inst, dict) else 'item'} "
                                        f"{name!r} is not allowed ({key} is false)")))
                else:
                    sub(value, (path, name), errs, depth + 1)

        out.add(kind, check_unevaluated)


_KEYWORD_BUILDERS = (
    _build_type, _build_enum_const, _build_in_place, _build_number, _build_string,
    _build_items, _build_array, _build_properties, _build_object, _build_unevaluated,
)

# Compiled validators by id(schema); each entry keeps its schema alive, and a hit is checked by
# identity, so a recycled id can never return another schema's validator.
_VALIDATOR_CACHE: dict[int, tuple[Any, _Node]] = {}
_VALIDATOR_CACHE_SIZE = 128


def _compiled_validator(schema: Any) -> _Node:
    """The cached root node for ``schema`` (a schema must not be mutated once it is validated)."""
    key = id(schema)
    entry = _VALIDATOR_CACHE.pop(key, None)
    if entry is None or entry[0] is not schema:
        entry = (schema, _SchemaCompiler(schema).compile(schema))
        while len(_VALIDATOR_CACHE) >= _VALIDATOR_CACHE_SIZE:
            try:
                del _VALIDATOR_CACHE[next(iter(_VALIDATOR_CACHE))]
            except (KeyError, StopIteration, RuntimeError):
                break       # another thread changed the cache; eviction is best effort
    _VALIDATOR_CACHE[key] = entry   # re-inserted last: least recently used entries go first
    return entry[1]


def _run_validator(node: _Node, instance: Any) -> list[tuple[str, str]]:
    """Every failure of ``instance`` against a compiled node, paths rendered."""
    errs: _Errors = []
    try:
        node(instance, None, errs, 0)
    except RecursionError as exc:
        raise SchemaValidationError(
            "validation exceeded Python's recursion limit: the value or the schema nests too "
            "deeply",
            [("$", "nesting too deep")]) from exc
    return [(_render_path(path), message) for path, message in errs]


def _failure(errors: list[tuple[str, str]], raw_text: str | None = None) -> SchemaValidationError:
    path, message = errors[0]
    more = (f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
            if len(errors) > 1 else "")
    return SchemaValidationError(f"value does not match the schema: {path}: {message}{more}",
                                 errors, raw_text)


def validate_json_schema(instance: Any, schema: dict[str, Any] | bool) -> None:
    """Validate a JSON value against a JSON Schema (draft 2020-12); return None when it conforms.

    Raises SchemaValidationError listing every failure in ``.errors`` as ``(json_path, message)``
    pairs such as ``("$.items[2].name", "missing required property 'id'")``. ``$ref`` must be
    local (``#`` or ``#/json/pointer``); ``format`` is an annotation and never rejects. A malformed
    schema raises SchemaValidationError naming the bad keyword. Compiled schemas are cached by
    identity, so validating many values against one schema object is cheap; do not mutate a
    schema after validating with it.
    """
    errors = _run_validator(_compiled_validator(schema), instance)
    if errors:
        raise _failure(errors)


# --- 5d. A validated value into a Python type ---------------------------------

@functools.lru_cache(maxsize=256)
def _cached_type_validator(tp: Any) -> _Node:
    schema = _cached_type_schema(tp, False)
    return _SchemaCompiler(schema).compile(schema)


def _matches_type(value: Any, tp: Any) -> bool:
    """Whether a JSON value validates against the schema of ``tp`` (picks a Union member)."""
    if _hashable(tp):
        node = _cached_type_validator(tp)
    else:
        schema = _TypeSchemaBuilder(tp, False).build()
        node = _SchemaCompiler(schema).compile(schema)
    return not _run_validator(node, value)


def _build_typed(value: Any, tp: Any) -> Any:
    """Turn a JSON value, already validated against ``_schema_from_type(tp)``, into ``tp``."""
    return _builder(tp)(value)


_Builder = Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


def _builder(tp: Any) -> _Builder:
    """How to build ``tp`` from a validated value: decided once per type, not per value."""
    return _cached_builder(tp) if _hashable(tp) else _make_builder(tp)


@functools.lru_cache(maxsize=512)
def _cached_builder(tp: Any) -> _Builder:
    return _make_builder(tp)


def _make_builder(tp: Any) -> _Builder:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _builder(args[0])
    if tp is Any or tp is str or tp is bool:
        return _identity
    if hasattr(tp, "__supertype__"):  # typing.NewType
        inner = _builder(tp.__supertype__)
        build: _Builder = lambda value: tp(inner(value))  # noqa: E731
    elif tp is float or tp is int or _is_enum(tp):
        build = tp  # int() also takes the 2.0 the schema accepts as an integer
    elif _is_class(tp) and (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)):
        build = _record_builder(tp)
    elif origin is typing.Literal:
        table = {_json_key(_literal_value(a, "Literal")): a for a in args}
        build = lambda value: table.get(_json_key(value), value)  # noqa: E731
    elif origin is typing.Union or origin is _UnionType:
        build = _union_builder([a for a in args if a is not _NoneType])
    else:
        build = _container_builder(tp, origin, args)
    return lambda value: None if value is None else build(value)


def _record_builder(tp: type) -> _Builder:
    """A dataclass or TypedDict; its fields' builders are made on first use, so a
    recursive type refers to itself."""
    fields: list[tuple[str, _Builder]] = []

    def build(value: Any) -> Any:
        if not fields:
            hints = _type_hints(tp)
            names = ([(f.name, hints.get(f.name, f.type)) for f in dataclasses.fields(tp)
                      if f.init] if dataclasses.is_dataclass(tp) else
                     [(k, _strip_qualifiers(h)) for k, h in hints.items()])
            # Published in one step: another thread never sees half the fields.
            fields[:] = [(name, _builder(hint)) for name, hint in names]
        built = {name: make(value[name]) for name, make in fields if name in value}
        if dataclasses.is_dataclass(tp):
            return tp(**built)
        return {**value, **built}
    return build


def _union_builder(members: list[Any]) -> _Builder:
    if len(members) == 1:
        return _builder(members[0])

    def build(value: Any) -> Any:
        return next((_builder(m)(value) for m in members if _matches_type(value, m)), value)
    return build


def _container_builder(tp: Any, origin: Any, args: tuple[Any, ...]) -> _Builder:
    base = origin or tp
    items = [_builder(a) for a in args if a is not Ellipsis]
    if base is tuple:      # typing.Tuple, bare or subscripted, has the origin tuple
        if not args:
            return tuple
        if len(args) == 2 and args[1] is Ellipsis:
            return lambda value: tuple(items[0](v) for v in value)
        return lambda value: tuple(b(v) for b, v in zip(items, value, strict=False))
    if base in (set, frozenset, collections.abc.Set, collections.abc.MutableSet):
        kind = frozenset if base is frozenset else set
        return lambda value: kind(items[0](v) for v in value) if items else kind(value)
    if base in _MAPPING_ORIGINS and len(args) == 2:
        return lambda value: {k: items[1](v) for k, v in value.items()}
    if base in _SEQUENCE_ORIGINS:
        return lambda value: [items[0](v) for v in value] if items else list(value)
    return _identity


# --- 5e. response_format, root wrapping, the OpenAI strict subset --------------

@dataclasses.dataclass(frozen=True, eq=False)
class _ResponseFormat:
    """A normalised ``response_format``: what to ask the provider for and how to read the reply.

    ``kind`` is "text", "json" (any JSON value) or "schema"; ``schema`` is shared and read-only;
    ``name`` matches OpenAI's ``[a-zA-Z0-9_-]{1,64}``; ``parse(raw_text)`` returns the typed value
    or raises SchemaValidationError with ``raw_text`` and JSON paths; ``unwrap`` is ``None``
    when the reply needs no unwrapping.
    """

    kind: str
    schema: dict[str, Any] | None = None
    name: str = "response"
    parse: Callable[[str], Any] | None = None
    # The plan for the wire, decided once: the schema to send (its root wrapped as an
    # object where that is needed, see _wrap_root) and how to unwrap the reply's text.
    wire_schema: dict[str, Any] | None = None
    unwrap: Callable[[str], str] | None = None


_ACCEPTED_FORMATS = ("'text', 'json', a JSON Schema dict, a dataclass, a TypedDict, an Enum, a "
                     "pydantic model class, a primitive (str, int, float, bool), or a typing form "
                     "such as list[X], dict[str, X], Literal[...], Optional[X] or a Union")


def _strip_fences(text: str) -> str:
    """Drop a Markdown code fence (```json ... ```) that some models wrap JSON replies in."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and len(stripped) >= 6:
        inner = stripped[3:-3]
        newline = inner.find("\n")
        first = inner[:newline] if newline >= 0 else ""
        if newline >= 0 and (not first.strip() or first.strip().isidentifier()):
            inner = inner[newline + 1:]         # the info string, e.g. "json"
        return inner.strip()
    return stripped


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _load_reply_json(text: Any) -> Any:
    """Parse a reply as strict JSON (no NaN/Infinity), tolerating a leading think block
    and a Markdown fence."""
    if not isinstance(text, str):
        raise SchemaValidationError(f"reply is not text but {type(text).__name__}",
                                    [("$", f"expected JSON text, got {type(text).__name__}")])
    try:
        return json.loads(_strip_fences(_split_think(text)[1]), parse_constant=_reject_constant)
    except ValueError as exc:       # json.JSONDecodeError is a ValueError
        raise SchemaValidationError(f"reply is not valid JSON: {exc}",
                                    [("$", f"invalid JSON: {exc}")], raw_text=text) from exc
    except RecursionError as exc:
        raise SchemaValidationError("reply nests too deeply to parse", [("$", "nesting too deep")],
                                    raw_text=text) from exc


def _check_reply(node: _Node, value: Any, text: str) -> None:
    errors = _run_validator(node, value)
    if errors:
        raise _failure(errors, raw_text=text)


def _format_name(name: Any) -> str:
    cleaned = re.sub(r"[^a-zA-Z0-9_-]+", "_", name if isinstance(name, str) else "")[:64].strip("_")
    return cleaned or "response"


_TEXT_FORMAT = _ResponseFormat("text")
_JSON_FORMAT = _ResponseFormat("json", None, "response", _load_reply_json)


def _schema_format(schema: dict[str, Any], name: str, parse: Callable[[str], Any]
                   ) -> _ResponseFormat:
    wire, unwrap = _wrap_root(schema)
    return _ResponseFormat("schema", schema, name, parse, wire,
                           None if unwrap is _unwrap_identity else unwrap)


def _format_from_schema(schema: dict[str, Any]) -> _ResponseFormat:
    node = _compiled_validator(schema)      # compiles now: a malformed schema fails early

    def parse(text: str) -> Any:
        value = _load_reply_json(text)
        _check_reply(node, value, text)
        return value

    return _schema_format(schema, _format_name(schema.get("title")), parse)


@functools.lru_cache(maxsize=128)
def _format_from_type(tp: Any) -> _ResponseFormat:
    schema = _cached_type_schema(tp, False)
    node = _cached_type_validator(tp)

    def parse(text: str) -> Any:
        value = _load_reply_json(text)
        _check_reply(node, value, text)
        return _build_typed(value, tp)

    name = tp.__name__ if _is_named_type(tp) else "response"
    return _schema_format(schema, _format_name(name), parse)


def _is_pydantic_model(tp: Any) -> bool:
    return (isinstance(tp, type) and callable(getattr(tp, "model_json_schema", None))
            and callable(getattr(tp, "model_validate", None)))


def _pydantic_failure(exc: Exception, text: str) -> SchemaValidationError:
    """Map a pydantic ValidationError (duck-typed: ``.errors()`` of dicts with loc and msg)."""
    errors = []
    details = getattr(exc, "errors", None)
    try:
        for item in details() if callable(details) else ():
            errors.append((_render_keys(item.get("loc", ())), str(item.get("msg", ""))))
    except Exception:  # any exotic errors() shape: fall back to str(exc)
        errors = []
    if not errors:
        errors = [("$", str(exc))]
    return _failure(errors, raw_text=text)


@functools.lru_cache(maxsize=64)
def _format_from_pydantic(model: Any) -> _ResponseFormat:
    """``model`` is a pydantic model class, duck-typed (see _is_pydantic_model): pydantic is
    never imported here."""
    schema = model.model_json_schema()

    def parse(text: str) -> Any:
        value = _load_reply_json(text)
        try:
            return model.model_validate(value)
        except (ValueError, TypeError) as exc:      # pydantic's ValidationError is a ValueError
            raise _pydantic_failure(exc, text) from exc

    return _schema_format(schema, _format_name(model.__name__), parse)


def _resolve_response_format(response_format: Any) -> _ResponseFormat:
    """Normalise a ``response_format`` argument (None means "text"); see _ACCEPTED_FORMATS."""
    if isinstance(response_format, _ResponseFormat):
        return response_format
    if response_format is None or (isinstance(response_format, str) and response_format == "text"):
        return _TEXT_FORMAT
    if isinstance(response_format, str) and response_format == "json":
        return _JSON_FORMAT
    if isinstance(response_format, dict):
        return _format_from_schema(response_format)
    if _is_pydantic_model(response_format):
        return _format_from_pydantic(response_format)
    if isinstance(response_format, str) or not _hashable(response_format):
        raise ValidationError(f"unsupported response_format {_short(response_format)}: "
                              f"expected {_ACCEPTED_FORMATS}", field="response_format",
                              value=response_format)
    try:
        return _format_from_type(response_format)
    except TypeError as exc:
        raise ValidationError(f"unsupported response_format {_short(response_format)}: expected "
                              f"{_ACCEPTED_FORMATS} ({exc})", field="response_format",
                              value=response_format) from exc


# Providers whose structured-output mode needs an object at the root (OpenAI strict mode, tool
# arguments for Anthropic) send a wrapper {"value": <schema>} instead; the decision lives here
# so all wire formats wrap the same way. $defs move to the wrapper's root and local pointers
# into the old root are rebased under /properties/value, so every $ref still resolves.
_NON_SCHEMA_KEYS = frozenset({"enum", "const", "default", "examples"})


def _is_object_schema(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "object"


def _rebase_refs(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_rebase_refs(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#") \
                and not value.startswith("#/$defs/"):
            value = "#/properties/value" + value[1:]
        elif key not in _NON_SCHEMA_KEYS:
            value = _rebase_refs(value)
        out[key] = value
    return out


def _unwrap_identity(text: str) -> str:
    return text


def _unwrap_value(text: str) -> str:
    """The inner JSON text of a ``{"value": ...}`` reply; other text passes through unchanged
    (so the parse step reports it with the model's own words)."""
    try:
        data = json.loads(_strip_fences(text))
    except (ValueError, RecursionError, TypeError):
        return text
    if isinstance(data, dict) and list(data) == ["value"]:
        return json.dumps(data["value"], ensure_ascii=False)
    return text


def _wrap_root(schema: Any) -> tuple[dict[str, Any], Callable[[str], str]]:
    """``(schema_to_send, unwrap)``: an object-root schema is returned as is with an identity
    ``unwrap``; any other root is wrapped as the ``value`` property of an object, and ``unwrap``
    turns the reply text back into the text of the inner value, ready for ``parse``."""
    if _is_object_schema(schema):
        return schema, _unwrap_identity
    inner = ({k: v for k, v in schema.items() if k != "$defs"} if isinstance(schema, dict)
             else schema)
    wrapped = {"type": "object", "properties": {"value": _rebase_refs(inner)},
               "required": ["value"], "additionalProperties": False}
    if isinstance(schema, dict) and "$defs" in schema:
        wrapped["$defs"] = _rebase_refs(schema["$defs"])
    return wrapped, _unwrap_value


# OpenAI Structured Outputs, strict mode ("Supported schemas" in the Structured Outputs guide):
# a conservative reading of the documented subset and limits.
_OPENAI_STRICT_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
    "$ref", "$defs", "description", "title", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
})
_OPENAI_STRICT_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname",
                                    "ipv4", "ipv6", "uuid"})
_OPENAI_MAX_PROPERTIES, _OPENAI_MAX_NESTING, _OPENAI_MAX_ENUM_VALUES = 5000, 10, 1000


def _openai_strict_ok(schema: Any) -> bool:
    """Whether ``schema`` already fits OpenAI's strict Structured Outputs subset: an object
    root (not anyOf), every object closed (additionalProperties false) with all its properties
    required, only supported keywords (no ``default``), within the documented size limits."""
    if not _is_object_schema(schema) or "anyOf" in schema:
        return False
    totals = {"properties": 0, "enum": 0}
    defs = schema.get("$defs", {})
    if not isinstance(defs, dict):
        return False
    roots = [(schema, True)] + [(d, False) for d in defs.values()]
    if not all(_strict_node_ok(s, 1, totals, is_root) for s, is_root in roots):
        return False
    return (totals["properties"] <= _OPENAI_MAX_PROPERTIES
            and totals["enum"] <= _OPENAI_MAX_ENUM_VALUES)


def _strict_node_ok(schema: Any, nesting: int, totals: dict[str, int],
                    is_root: bool = False) -> bool:
    if not isinstance(schema, dict) or nesting > _OPENAI_MAX_NESTING:
        return False
    if not set(schema) <= _OPENAI_STRICT_KEYWORDS or ("$defs" in schema and not is_root):
        return False
    if not ({"type", "anyOf", "$ref", "enum", "const"} & set(schema)):
        return False        # an unconstrained {} is not expressible in strict mode
    if "format" in schema and schema["format"] not in _OPENAI_STRICT_FORMATS:
        return False
    if isinstance(schema.get("$ref"), str) and not schema["$ref"].startswith("#"):
        return False
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    children = [(s, nesting) for s in schema.get("anyOf", ())]
    if "object" in types or "properties" in schema:
        properties = schema.get("properties", {})
        if (schema.get("additionalProperties") is not False or not isinstance(properties, dict)
                or sorted(schema.get("required", [])) != sorted(properties)):
            return False
        totals["properties"] += len(properties)
        children += [(s, nesting + 1) for s in properties.values()]
    if "array" in types:
        if not isinstance(schema.get("items"), dict):
            return False
        children.append((schema["items"], nesting + 1))
    totals["enum"] += len(schema.get("enum", ()))
    return all(_strict_node_ok(child, level, totals) for child, level in children)


# --- 5f. The call: ChatOptions, merged and checked once -----------------------
# Whichever face a call came through (0.5 keywords, 0.7 ``options=``, a model's
# defaults, a client's extras), it becomes one ``_Call`` that Model, the clients and
# the wire formats all read.

_TOOL_CHOICES = ("auto", "none", "required")
_EFFORTS = ("low", "medium", "high")
_SYSTEM_HANDLINGS = ("passthrough", "merge")


@dataclasses.dataclass
class ChatOptions:
    """The settings of one call, as upstream 0.7/0.8 define them.

    Give them per call (``chat(messages, options=...)``) or as a model's
    ``default_options``; fields left ``None`` take the defaults below them, and
    ``extra`` dicts (raw provider fields, sent as they are) merge, the call's
    keys winning. ``tool_choice`` is ``"auto"``, ``"none"``, ``"required"`` or a
    tool's name; ``system_message_handling="merge"`` joins the system messages
    into one. ``parallel_tool_calls`` and ``reasoning`` (how hard a reasoning
    model thinks: ``"low"``, ``"medium"``, ``"high"``, a token budget, ``True``
    for the provider's default or ``False`` for none) are casual_llm's own
    additions. Each provider gets the options in its own form; one it does not take
    is left out, with a warning naming it.
    """

    response_format: Any = "text"
    max_tokens: int | None = None
    tools: list[Tool] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    tool_choice: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    top_k: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    system_message_handling: Literal["passthrough", "merge"] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: bool | Literal["low", "medium", "high"] | int | None = None

    def __post_init__(self) -> None:
        fields = {name: getattr(self, name) for name in _OPTION_NAMES}
        fields["extra"] = self.extra
        _check_options("ChatOptions", fields)
        for name, value in fields.items():
            setattr(self, name, value)


_OPTION_NAMES = ("response_format", "max_tokens", "tools", "temperature", "top_p", "stop",
                 "tool_choice", "frequency_penalty", "presence_penalty", "seed", "top_k",
                 "system_message_handling", "parallel_tool_calls", "reasoning")


def _check_tools(owner: str, field: str, value: Any) -> list[Tool]:
    if not isinstance(value, (list, tuple)):
        _fail(owner, field, "a list of Tool", value)
    return [t if isinstance(t, Tool) else _coerce(owner, field, t, Tool) for t in value]


def _check_stop(owner: str, field: str, value: Any) -> list[str]:
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        _fail(owner, field, "a string or a list of strings", value)
    return list(stop)


def _check_choice(owner: str, field: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        _fail(owner, field, " or ".join(repr(c) for c in choices), value)
    return value


def _check_format(owner: str, field: str, value: Any) -> Any:
    try:
        _resolve_response_format(value)
    except TypeError as exc:
        raise ValidationError(f"{owner}.{field}: {exc}", field=field, value=value) from None
    return value


def _checked(check: Callable[..., None], **kw: Any) -> Callable[[str, str, Any], Any]:
    """A ``_check_*`` function that returns the value it accepted."""
    def run(owner: str, field: str, value: Any) -> Any:
        check(owner, field, value, **kw)
        return value
    return run


def _check_tool_choice(owner: str, field: str, value: Any) -> Any:
    if not isinstance(value, str) or not value:
        _fail(owner, field, "'auto', 'none', 'required' or a tool's name", value)
    return value


def _check_reasoning(owner: str, field: str, value: Any) -> Any:
    if not (isinstance(value, bool) or value in _EFFORTS or (
            isinstance(value, int) and value >= 1)):
        _fail(owner, field, "'low', 'medium', 'high', a token budget, True or False", value)
    return value


def _check_bool(owner: str, field: str, value: Any) -> Any:
    if not isinstance(value, bool):
        _fail(owner, field, "True, False or None", value)
    return value


_OPTION_CHECKS: dict[str, Callable[[str, str, Any], Any]] = {
    "response_format": _check_format,
    "max_tokens": _checked(_check_int, minimum=1),
    "tools": _check_tools,
    "temperature": _checked(_check_number, minimum=0),
    "top_p": _checked(_check_number, minimum=0, maximum=1),
    "stop": _check_stop,
    "tool_choice": _check_tool_choice,
    "frequency_penalty": _checked(_check_number),
    "presence_penalty": _checked(_check_number),
    "seed": _checked(_check_int, minimum=-(1 << 63)),
    "top_k": _checked(_check_int, minimum=1),
    "system_message_handling": lambda o, f, v: _check_choice(o, f, v, _SYSTEM_HANDLINGS),
    "parallel_tool_calls": _check_bool,
    "reasoning": _check_reasoning,
}


def _check_options(owner: str, fields: dict[str, Any]) -> None:
    """Check and normalise option values in place (``None`` is always accepted)."""
    for name, value in fields.items():
        if value is not None and name != "extra":
            fields[name] = _OPTION_CHECKS[name](owner, name, value)
    extra = fields.get("extra")
    if extra == {}:
        return
    extra = _check_extra(owner, "extra", extra)
    # One reply per call, without log probabilities: refused rather than dropped.
    n = extra.get("n")
    if n not in (None, 1):
        raise ValidationError(f"{owner}: n={n!r} is not supported: casual_llm returns one reply "
                              "per call; make n calls instead", field="n", value=n)
    for key in ("logprobs", "top_logprobs"):
        if extra.get(key):
            raise ValidationError(f"{owner}: {key}={extra[key]!r} is not supported: casual_llm "
                                  "does not return log probabilities", field=key, value=extra[key])


class _Call(typing.NamedTuple):
    """One call, checked once; ``options`` is the merged ChatOptions, never changed."""

    model: str
    messages: list[ChatMessage]
    options: ChatOptions
    fmt: _ResponseFormat


def _new_call(owner: str, model: Any, messages: Any,
              layers: Iterable[ChatOptions | dict[str, Any] | None]) -> _Call:
    """Merge ``layers`` (lowest first: client, model, per-call options, keywords; each a
    ChatOptions or a dict of options with the extras under ``"extra"``) into one checked
    ``_Call``: an option that is set wins over the layers below, extras merge."""
    _check_str(owner, "model", model)
    fields: dict[str, Any] = {}
    from_extra: set[str] = set()  # options whose value an extra gave
    extra: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        items = vars(layer) if isinstance(layer, ChatOptions) else layer
        raw: dict[str, Any] = items.get("extra") or {}
        lifted: Collection[str] = ()
        if raw and not raw.keys().isdisjoint(_OPTION_CHECKS):
            # An extra named like an option (``seed=1`` as a 0.5 keyword, or in
            # ``extra``) is that option, so it is mapped to each provider's form.
            lifted = {k for k in raw if k in _OPTION_CHECKS and items.get(k) is None}
            items = {**items, **{k: raw[k] for k in lifted}}
            raw = {k: v for k, v in raw.items() if k not in lifted}
        for name, value in items.items():
            if value is None or name == "extra" or (
                    # "text", the default response_format, does not override a default's
                    name == "response_format" and isinstance(value, str) and value == "text"):
                continue
            if from_extra and name in from_extra and name not in lifted:
                logger.warning("extra %r ignored: the call sets %s", name, name)
                from_extra.discard(name)
            elif lifted and name in lifted:
                from_extra.add(name)
            fields[name] = value
        if raw:
            extra.update(raw)
    fields["extra"] = extra
    _check_options(owner, fields)
    options = object.__new__(ChatOptions)  # checked above: not checked again
    vars(options).update(_UNSET_OPTIONS, **fields)
    return _Call(model, _check_messages(messages), options,
                 _resolve_response_format(options.response_format))


_UNSET_OPTIONS: dict[str, Any] = {**dict.fromkeys(_OPTION_NAMES), "response_format": "text"}


# === 6. Transport ============================================================
# The only code that touches sockets and threads. http.client (what urllib uses
# underneath) keeps connections alive; urllib.request supplies the proxy rules.
# Blocking work runs on the module's own workers and reaches asyncio through
# ``_run_blocking`` (one result) and ``_aiter_blocking`` (a stream of batches).

_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
_SENSITIVE_HEADERS = frozenset({"authorization", "api-key", "proxy-authorization", "cookie"}
                               ).union(*(facts.key_headers for facts in _PROVIDERS.values()))
_MAX_REDIRECTS = 5
_MAX_ERROR_BODY = 1 << 20
_MAX_INTERIM = 16  # interim (1xx) responses before the reply; http.client takes any number
_MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
_MAX_TRAILERS = 16384  # the trailer section after the last chunk


class _Aborted(Exception):
    """Raised in a worker whose caller went away (cancelled, broke out of a stream)."""


class _Abort:
    """Lets the event loop stop a worker: sets a flag and shuts its socket down.

    The socket is attached only while the worker uses it; one lock orders
    ``abort`` against ``detach``, so a socket back in the pool is never shut.
    """

    __slots__ = ("_children", "_event", "_lock", "_sock")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sock: Any = None
        self._children: list[_Abort] = []

    @property
    def aborted(self) -> bool:
        return self._event.is_set()

    def attach(self, sock: Any) -> None:
        with self._lock:
            self._sock = sock
        if self._event.is_set():
            raise _Aborted()

    def detach(self) -> bool:
        """Take the socket out of reach; ``False`` when an abort already shut it."""
        with self._lock:
            self._sock = None
            return not self._event.is_set()

    def abort(self) -> None:
        with self._lock:
            self._event.set()
            sock, children = self._sock, list(self._children)
            if sock is not None:
                import socket
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for child in children:
            child.abort()

    def child(self) -> _Abort:
        """An abort with a socket of its own (one of several parallel downloads) that
        this one's abort reaches too; it can also be aborted alone (a deadline)."""
        child = _Abort()
        with self._lock:
            self._children.append(child)
            aborted = self._event.is_set()
        if aborted:
            child.abort()
        return child

    def sleep(self, seconds: float) -> None:
        """Wait between retries; wakes at once when aborted."""
        if self._event.wait(seconds):
            raise _Aborted()


class _Workers:
    """Threads for blocking HTTP: one more whenever none is idle, idle ones exit.

    asyncio's default executor has min(32, cores + 4) threads, which would cap
    concurrent requests at 6 on a 2-core machine.
    """

    def __init__(self, idle_timeout: float = 30.0) -> None:
        import queue
        self._queue: Any = queue.SimpleQueue()
        self._empty = queue.Empty
        self._idle = threading.Semaphore(0)
        self._idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self.busy = 0

    def submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)
        if not self._idle.acquire(blocking=False):
            threading.Thread(target=self._work, name="casual_llm-worker", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                fn = self._queue.get(timeout=self._idle_timeout)
            except self._empty:
                if self._idle.acquire(blocking=False):
                    return
                continue
            with self._lock:
                self.busy += 1
            try:
                fn()
            except BaseException:  # pragma: no cover - the jobs catch their own
                logger.exception("casual_llm worker job failed")
            finally:
                with self._lock:
                    self.busy -= 1
            self._idle.release()


_workers = _Workers()


def _resolve_future(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if not fut.done():
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


async def _run_blocking(fn: Callable[[_Abort], _T]) -> _T:
    """Run ``fn(abort)`` on a worker; cancelling the caller aborts it."""
    import asyncio
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_T] = loop.create_future()
    abort = _Abort()

    def job() -> None:
        value: Any
        try:
            ok, value = True, fn(abort)
        except BaseException as exc:  # handed to the awaiting task
            ok, value = False, exc
        abort.detach()
        try:
            loop.call_soon_threadsafe(_resolve_future, fut, ok, value)
        except RuntimeError:  # the loop closed while the call ran
            pass

    _workers.submit(job)
    try:
        return await fut
    except asyncio.CancelledError:
        abort.abort()
        raise


class _Channel:
    """Batches handed from one worker to one coroutine; a hop only when it waits."""

    _END: ClassVar[object] = object()
    _LIMIT = 256  # batches read ahead before the worker waits for the reader

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import collections
        self._loop = loop
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._room = threading.Event()
        self._room.set()

    def put(self, item: Any, abort: _Abort) -> None:
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
            if len(self._items) >= self._LIMIT:
                self._room.clear()
        if waiter is not None:
            try:
                self._loop.call_soon_threadsafe(_resolve_future, waiter, True, None)
            except RuntimeError:
                raise _Aborted() from None
        while not self._room.is_set() and not self._room.wait(0.05):
            if abort.aborted:
                raise _Aborted()

    async def get(self) -> list[Any]:
        """Every item put so far (at least one); waits only when there is none."""
        waiter = None
        with self._lock:
            if not self._items:
                waiter = self._waiter = self._loop.create_future()
        if waiter is not None:
            await waiter
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._room.set()
        return items


async def _aiter_blocking(produce: Callable[[_Abort], Generator[list[_T], None, None]]
                          ) -> AsyncIterator[_T]:
    """Items of the batches ``produce(abort)`` yields on a worker, as an async iterator.

    ``break``, ``aclose()`` or cancelling the consumer aborts the worker, which
    closes its connection.
    """
    import asyncio
    channel = _Channel(asyncio.get_running_loop())
    abort = _Abort()
    end = _Channel._END

    def job() -> None:
        batches = None
        last: Any = end
        try:
            batches = produce(abort)
            for batch in batches:
                channel.put(batch, abort)
        except _Aborted:
            return
        except BaseException as exc:  # handed to the consumer
            last = exc
        finally:
            if batches is not None:
                batches.close()
        abort.detach()  # the connection may be back in the pool: out of the abort's reach
        try:
            channel.put(last, abort)
        except _Aborted:
            pass

    _workers.submit(job)
    try:
        while True:
            for batch in await channel.get():
                if batch is end:
                    return
                if isinstance(batch, BaseException):
                    raise batch
                for item in batch:
                    yield item
    finally:
        abort.abort()


def _iter_blocking(agen: AsyncIterator[_T]) -> Iterator[_T]:
    """An async iterator consumed from synchronous code (a loop on a worker)."""
    import asyncio
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="casual_llm-loop", daemon=True)
    runner.start()
    try:
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(_next_item(agen), loop).result()
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            asyncio.run_coroutine_threadsafe(aclose(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=5)
        loop.close()


async def _next_item(agen: AsyncIterator[_T]) -> _T:
    return await agen.__anext__()


def _run_coroutine(coro: Any) -> Any:
    """Await ``coro`` from synchronous code, even where a loop already runs (notebooks)."""
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[Any] = []

    def run() -> None:
        try:
            result.append((True, asyncio.run(coro)))
        except BaseException as exc:
            result.append((False, exc))

    thread = threading.Thread(target=run, name="casual_llm-sync", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


@dataclasses.dataclass(slots=True)
class _Request:
    """One HTTP request, with how to send it."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    timeout: float | None
    max_retries: int = 2
    ssl_context: ssl.SSLContext | None = None
    # The wait for the response once the request is sent, when it differs from timeout
    # (a non-streamed reply comes whole, after the model has thought); inf: no limit.
    reply_timeout: float | None = None
    # For a URL from a message (an image): given host, port and whether a proxy carries
    # the request, the checked address to connect to (None: the proxy resolves it), or
    # an exception. Checked again on every redirect; such connections are never pooled.
    guard: Callable[[str, int, bool], str | None] | None = None

    def __repr__(self) -> str:
        return f"_Request({self.method} {_redact_url(self.url)})"


def _url_problem(url: str) -> str | None:
    """What makes ``url`` unusable as a server URL, if anything: it must be http(s) with
    a host and a numeric port, without a space, a control character (urllib strips them,
    so the request would go to a rewritten path) or a fragment (never sent)."""
    from urllib.parse import urlsplit
    if (where := _bad_char(url)) is not None or " " in url or "\t" in url:
        return f"it holds {where or 'a space or a tab'}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number below 65536
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "it must start with http:// or https:// and name a host"
    if "#" in url:
        return "it has a #fragment, which is never sent"
    return None


def _redact_url(url: str) -> str:
    """A URL for messages: no query string, no user info."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
    except ValueError:  # an IPv6 bracket left open: nothing in it is safe to show
        return "<URL that cannot be parsed>"
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}"


def _ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """The default TLS context, honouring SSL_CERT_FILE / SSL_CERT_DIR; built once per setting."""
    return _ssl_context_cached(cafile, _env("SSL_CERT_FILE"), _env("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=8)
def _ssl_context_cached(cafile: str | None, env_file: str | None,
                        env_dir: str | None) -> ssl.SSLContext:
    import ssl
    context = ssl.create_default_context(cafile=cafile)
    if env_file or env_dir:
        # OpenSSL reads these when the defaults load; load them again explicitly so they
        # work on every platform's Python (some builds load a bundled store instead).
        context.load_verify_locations(cafile=env_file, capath=env_dir)
    return context


def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy URL for a target, from HTTP(S)_PROXY / NO_PROXY, as urllib reads them."""
    key = tuple(os.environ.get(n) for n in (
        "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
        "all_proxy", "ALL_PROXY"))
    return _proxy_for_cached(scheme, host, key)


@functools.lru_cache(maxsize=64)
def _proxy_for_cached(scheme: str, host: str, _env_key: tuple[str | None, ...]) -> str | None:
    import urllib.request
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


class _Pool:
    """Idle keep-alive connections, by (scheme, host, port, proxy, TLS context)."""

    _MAX_IDLE = 32  # per target: enough for bursts, few enough to leave servers alone

    def __init__(self) -> None:
        self._idle: dict[tuple[Any, ...], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: tuple[Any, ...]) -> http.client.HTTPConnection | None:
        with self._lock:
            conns = self._idle.get(key)
            return conns.pop() if conns else None

    def release(self, key: tuple[Any, ...], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            conns = self._idle.setdefault(key, [])
            if len(conns) < self._MAX_IDLE:
                conns.append(conn)
                return
        conn.close()

    def clear(self) -> None:
        with self._lock:
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for conn in conns:
            conn.close()


_pool = _Pool()


@functools.cache
def _response_class() -> type[http.client.HTTPResponse]:
    """http.client's response, with interim (1xx) responses skipped and counted. Left to
    itself, http.client skips any number of ``100 Continue`` (a server sending them forever
    holds the call forever) and takes a ``103 Early Hints`` for the reply, leaving the
    real one on the connection for the next request to read."""
    import http.client

    class Response(http.client.HTTPResponse):
        def _read_status(self) -> tuple[str, int, str]:  # the hook begin() calls
            for _ in range(_MAX_INTERIM):
                version, status, reason = super()._read_status()  # type: ignore[misc]
                if status >= 200 or status == 101:
                    return version, status, reason
                for _ in range(101):  # its headers, as many as http.client allows
                    line = self.fp.readline(65537)
                    if line in (b"\r\n", b"\n", b""):
                        break
                else:
                    raise http.client.HTTPException("an interim response with too many headers")
            raise APIConnectionError(f"more than {_MAX_INTERIM} interim (1xx) responses "
                                     "came before the reply")
    return Response


class _Connection:
    """One exchange on a (maybe reused) connection; returns it to the pool when clean."""

    __slots__ = ("abort", "conn", "headers", "key", "response", "reused", "target")

    def __init__(self, req: _Request, abort: _Abort | None, fresh: bool = False) -> None:
        import http.client
        import socket
        from urllib.parse import urlsplit
        parts = urlsplit(req.url)
        scheme, host = parts.scheme, parts.hostname or ""
        if scheme not in ("http", "https") or not host:
            raise ConfigurationError(f"URL must be http:// or https:// with a host, got "
                                     f"{_redact_url(req.url)!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        proxy = _proxy_for(scheme, host)
        pinned = None if req.guard is None else req.guard(host, port, proxy is not None)
        context = (req.ssl_context or _ssl_context()) if scheme == "https" else None
        self.abort = abort
        self.key = None if req.guard else (scheme, host, port, proxy, id(context))
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.headers = dict(req.headers)
        pooled = None if fresh or self.key is None else _pool.acquire(self.key)
        self.reused = pooled is not None
        if pooled is not None:
            self.conn = pooled
        elif proxy is None:
            self.conn = (
                http.client.HTTPSConnection(host, port, timeout=req.timeout, context=context)
                if context else http.client.HTTPConnection(host, port, timeout=req.timeout))
        else:
            self.conn = _proxy_connection(proxy, scheme, host, port, req.timeout, context)
        self.conn.response_class = _response_class()
        if proxy is not None and scheme == "http":
            # A plain-http proxy gets the absolute URL and its credentials on every request.
            self.target = f"http://{host}:{port}{self.target}"
            self.headers.update(_proxy_auth(proxy))
        connect = (socket.create_connection if abort is None
                   else functools.partial(_connect_socket, abort=abort))
        if pinned is not None:  # the address checked, whatever the name resolves to now
            def connect_pinned(address: tuple[str, int], *args: Any) -> Any:
                return connect((pinned, address[1]), *args)
            self.conn._create_connection = connect_pinned  # type: ignore[attr-defined]
        elif abort is not None:
            self.conn._create_connection = connect  # type: ignore[attr-defined]

    def send(self, req: _Request) -> None:
        """Connect if needed, send the request and read the response head."""
        conn = self.conn
        try:
            conn.timeout = req.timeout
            if conn.sock is None:
                conn.connect()
            else:
                conn.sock.settimeout(req.timeout)
            if self.abort is not None:
                self.abort.attach(conn.sock)
            conn.request(req.method, self.target, body=req.body, headers=self.headers)
            wait = req.timeout if req.reply_timeout is None else req.reply_timeout
            if wait != req.timeout and conn.sock is not None:
                conn.sock.settimeout(None if wait is None or math.isinf(wait) else wait)
            try:
                self.response = conn.getresponse()
            except TimeoutError as exc:
                # The request went out: a slow model is not asked again (the SDKs' retry
                # of this case makes a 60 s timeout fail after 3 minutes, 3 generations).
                raise APITimeoutError(f"timed out after {wait:g}s waiting for a reply "
                                      f"from {_redact_url(req.url)}") from exc
            except APIConnectionError as exc:  # the response class's: too many interims
                raise APIConnectionError(f"{_redact_url(req.url)}: {exc}") from None
        except BaseException:
            conn.close()
            raise

    def finish(self) -> None:
        """Give the connection back if the response was read to its end, else close it."""
        clean = self.response.isclosed() and not self.response.will_close
        if self.abort is not None and not self.abort.detach():
            clean = False
        if clean and self.key is not None:
            _pool.release(self.key, self.conn)
        else:
            self.conn.close()

    def close(self) -> None:
        self.conn.close()


def _connect_socket(address: tuple[str, int], timeout: float | None = None,
                    source_address: Any = None, *, abort: _Abort) -> Any:
    """``socket.create_connection`` that an abort interrupts: the socket is attached
    before connecting, and the connect waits in short steps that check the flag."""
    import errno
    import select
    import socket
    error: OSError | None = None
    deadline = None if timeout is None else time.monotonic() + timeout
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(*address, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            abort.attach(sock)
            sock.setblocking(False)
            code = sock.connect_ex(sockaddr)
            while code in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"connect timed out after {timeout:g}s")
                if select.select([], [sock], [], 0.05)[1]:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if abort.aborted:
                    raise _Aborted()
            if code:
                raise OSError(code, os.strerror(code))
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {address[0]!r}")


def _proxy_auth(proxy: str) -> dict[str, str]:
    """The Proxy-Authorization header for a proxy URL with credentials, else nothing."""
    import base64
    from urllib.parse import unquote, urlsplit
    p = urlsplit(proxy)
    if not p.username:
        return {}
    token = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
    return {"Proxy-Authorization": _Secret("Basic " + base64.b64encode(token).decode())}


def _proxy_connection(proxy: str, scheme: str, host: str, port: int, timeout: float | None,
                      context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    """A connection to ``proxy``: a CONNECT tunnel for https, plain HTTP for http."""
    import http.client
    from urllib.parse import urlsplit
    p = urlsplit(proxy)
    proxy_port = p.port or (443 if p.scheme == "https" else 80)
    if scheme == "https":
        conn = http.client.HTTPSConnection(p.hostname or "", proxy_port, timeout=timeout,
                                           context=context)
        conn.set_tunnel(host, port, headers=_proxy_auth(proxy))
        return conn
    return http.client.HTTPConnection(p.hostname or "", proxy_port, timeout=timeout)


def _open(req: _Request, abort: _Abort | None) -> _Connection:
    """Send ``req`` and return its 2xx response, retrying and following redirects."""
    attempt = redirects = 0
    while True:
        try:
            exchange = _exchange(req, abort)
        except APIError:
            raise
        except (OSError, _http_exception()) as exc:
            if abort is not None and abort.aborted:
                raise _Aborted() from exc
            error = _connection_error(exc, req)
            if attempt >= req.max_retries or type(exc).__name__ == "InvalidURL":
                raise error from exc
            delay = _backoff(attempt, None)
        else:
            resp = exchange.response
            status = resp.status
            if _debugging():
                logger.debug("%s %s -> %d (request id %s)", req.method, _redact_url(req.url),
                             status, resp.getheader("x-request-id") or resp.getheader("request-id"))
            if 200 <= status < 300:
                return exchange
            if status in (301, 302, 303, 307, 308) and resp.getheader("location"):
                exchange.response.read(_MAX_ERROR_BODY)
                exchange.finish()
                redirects += 1
                if redirects > _MAX_REDIRECTS:
                    raise APIConnectionError(f"too many redirects for {_redact_url(req.url)}")
                req = _redirected(req, status, resp.getheader("location", ""))
                continue
            status_error = _status_error(exchange, req)
            if attempt >= req.max_retries or not _should_retry(status, resp):
                raise status_error
            delay = _backoff(attempt, status_error.retry_after)
        attempt += 1
        logger.debug("retrying %s %s in %.2fs", req.method, _redact_url(req.url), delay)
        if abort is not None:
            abort.sleep(delay)
        else:
            time.sleep(delay)


def _exchange(req: _Request, abort: _Abort | None) -> _Connection:
    """One attempt; a pooled connection the server had already closed is replaced once
    (outside ``max_retries``: the request never reached the server)."""
    exchange = _Connection(req, abort)
    try:
        exchange.send(req)
    except (ConnectionError, _http_exception()) as exc:
        stale = isinstance(exc, (ConnectionResetError, BrokenPipeError)) or type(
            exc).__name__ in ("RemoteDisconnected", "BadStatusLine")
        if not (exchange.reused and stale) or (abort is not None and abort.aborted):
            raise
        exchange = _Connection(req, abort, fresh=True)
        exchange.send(req)
    return exchange


def _http_exception() -> type[Exception]:
    import http.client
    return http.client.HTTPException


def _connection_error(exc: BaseException, req: _Request) -> APIConnectionError:
    import socket
    where = _redact_url(req.url)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return APITimeoutError(f"timed out after {req.timeout:g}s waiting for {where}")
    return APIConnectionError(f"could not reach {where}: {exc}")


def _should_retry(status: int, resp: http.client.HTTPResponse) -> bool:
    override = (resp.getheader("x-should-retry") or "").lower()
    if override in ("true", "false"):
        return override == "true"
    return status in _RETRY_STATUSES or status >= 500


def _backoff(attempt: int, retry_after: float | None) -> float:
    """The server's delay when it gave a sane one, else exponential backoff with jitter."""
    import random
    if retry_after is not None and 0 <= retry_after <= 60:
        return retry_after
    return float(min(0.5 * 2 ** attempt, 8.0) * (1 - 0.25 * random.random()))


def _redirected(req: _Request, status: int, location: str) -> _Request:
    """The request to repeat at ``location``; credentials stay behind on another origin."""
    from urllib.parse import urljoin, urlsplit
    url = urljoin(req.url, location).partition("#")[0]  # a fragment is never sent
    if (problem := _url_problem(url)) is not None:
        raise APIConnectionError(f"{_redact_url(req.url)} redirected to a URL that is not "
                                 f"valid: {problem}")
    old, new = urlsplit(req.url), urlsplit(url)
    headers = dict(req.headers)
    if (old.scheme, old.hostname, old.port) != (new.scheme, new.hostname, new.port):
        headers = {k: v for k, v in headers.items()
                   if not isinstance(v, _Secret) and k.lower() not in _SENSITIVE_HEADERS}
    if status in (307, 308):
        return dataclasses.replace(req, url=url, headers=headers)
    headers.pop("Content-Type", None)
    return dataclasses.replace(req, method="GET", url=url, headers=headers, body=None)


def _retry_after(resp: http.client.HTTPResponse) -> float | None:
    ms = resp.getheader("retry-after-ms")
    try:
        if ms is not None:
            return float(ms) / 1000
        value = resp.getheader("retry-after")
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            import email.utils
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _status_error(exchange: _Connection, req: _Request) -> APIStatusError:
    """The typed exception for a non-2xx response, with the provider's own words."""
    resp = exchange.response
    try:
        raw = resp.read(_MAX_ERROR_BODY)
        exchange.finish()
    except (OSError, _http_exception(), ValueError, OverflowError):  # and bad chunk sizes
        raw = b""
        exchange.close()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    details = _error_details(_scrub_secrets(raw, exchange.headers, req.url), headers)
    text = details["provider_message"] or resp.reason or "no message"
    rid = details["request_id"]
    message = (f"{resp.status} from {req.method} {_redact_url(req.url)}: {text}"
               + (f" (request id {rid})" if rid else ""))
    return _status_error_class(resp.status)(
        message, status_code=resp.status, headers=headers, retry_after=_retry_after(resp),
        **details)


def _scrub_secrets(raw: bytes, sent: dict[str, str], url: str) -> bytes:
    """An error body with every secret of the request taken out (its key, a gateway's
    header, the proxy's and the URL's credentials): some servers echo the key they
    refused, and the body becomes the exception's message."""
    text = raw.decode("utf-8", "surrogateescape")
    scrubbed = _scrub(text, _secrets_in(sent, url))
    return raw if scrubbed == text else scrubbed.encode("utf-8", "surrogateescape")


def _scrub_error(exc: APIError, sent: Mapping[str, str], url: str) -> None:
    """Take every secret of the request out of ``exc``, in place: a stream's error event,
    or a reply the parser refused, can echo the key as an error body can."""
    secrets = _secrets_in(sent, url)
    if not secrets:
        return

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return _scrub(value, secrets)
        if isinstance(value, list):
            return [scrub(item) for item in value]
        if isinstance(value, dict):
            return {scrub(key): scrub(item) for key, item in value.items()}
        return value
    exc.args = tuple(scrub(list(exc.args)))
    exc.message, exc.provider_message = scrub(exc.message), scrub(exc.provider_message)
    try:
        exc.body = scrub(exc.body)
    except RecursionError:  # JSON nested as deep as the parser allows
        exc.body = None


def _error_details(raw: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """Message, type, code and request id from any of the error bodies servers send."""
    body: Any = raw.decode("utf-8", "replace")
    message: Any = body.strip()[:500] or None
    error_type = code = None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # JSON nested too deeply for the parser
        pass
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            message, error_type, code = err.get("message"), err.get("type"), err.get("code")
        elif isinstance(err, str):
            message = err
        elif isinstance(body.get("message"), str):
            message, error_type, code = body["message"], body.get("type"), body.get("code")
    request_id = (headers.get("x-request-id") or headers.get("request-id")
                  or (body.get("request_id") if isinstance(body, dict) else None))
    return {"provider_message": None if message is None else str(message),
            "request_id": request_id, "body": body, "error_type": error_type,
            "error_code": code}


def _request_json(req: _Request, abort: _Abort | None = None) -> tuple[Any, dict[str, str]]:
    """Send ``req`` and read its whole JSON reply (chats, model lists, embeddings)."""
    exchange = _open(req, abort)
    limit = MAX_RESPONSE_SIZE
    try:
        raw = exchange.response.read(limit + 1)
    except (OSError, _http_exception()) as exc:
        exchange.close()
        if abort is not None and abort.aborted:
            raise _Aborted() from exc
        raise _connection_error(exc, req) from exc
    except (ValueError, OverflowError):  # http.client's reading of a bad chunk size
        exchange.close()
        raise APIError(f"{_redact_url(req.url)} answered with broken chunked framing "
                       "(a chunk size that is not a size)") from None
    headers = {k.lower(): v for k, v in exchange.response.getheaders()}
    if len(raw) > limit:
        exchange.close()
        raise APIError(f"{_redact_url(req.url)} answered with more than {limit} bytes "
                       "(raise casual_llm.MAX_RESPONSE_SIZE to accept it)",
                       request_id=_request_id(headers))
    exchange.finish()
    try:
        return json.loads(raw), headers
    except (ValueError, RecursionError):
        start = _scrub_secrets(raw[:400], exchange.headers, req.url)[:200]
        raise APIError(f"{_redact_url(req.url)} answered with a body that is not JSON: "
                       f"{_short(start)}", request_id=_request_id(headers)) from None


def _request_id(headers: dict[str, str]) -> str | None:
    return headers.get("x-request-id") or headers.get("request-id")


class _LineBuffer:
    """Bytes in, complete lines out, in time linear in the input: a partial line is kept
    in a growing buffer, never joined again and again; a line (or event) longer than
    ``MAX_STREAM_EVENT_SIZE`` is refused as soon as it passes the limit."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def _split(self, chunk: bytes) -> list[bytes]:
        end = chunk.rfind(b"\n")
        if end < 0:
            self._buf += chunk
            self._check(len(self._buf))
            return []
        lines = chunk[:end].split(b"\n")
        if self._buf:
            self._buf += lines[0]
            lines[0] = bytes(self._buf)
            self._check(len(lines[0]))
        self._buf = bytearray(chunk[end + 1:])
        return lines

    def _tail(self) -> bytes:
        tail, self._buf = bytes(self._buf), bytearray()
        return tail

    @staticmethod
    def _check(size: int) -> None:
        if size > MAX_STREAM_EVENT_SIZE:
            raise StreamError(f"a stream event is longer than {MAX_STREAM_EVENT_SIZE} bytes "
                              "(raise casual_llm.MAX_STREAM_EVENT_SIZE to accept it)")


class _SSEDecoder(_LineBuffer):
    """Server-sent events: bytes in, each event's ``data`` out.

    Lines end in LF or CRLF; ``:`` starts a comment; ``data:`` loses one optional
    space; several ``data`` lines join with LF; a blank line ends the event;
    ``event``, ``id`` and ``retry`` are not needed (the JSON names its type).
    """

    __slots__ = ("_data", "_size")

    def __init__(self) -> None:
        super().__init__()
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        return self._lines(self._split(chunk))

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        events = []
        data, size = self._data, self._size
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data, size = [], 0
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
                size += len(line)
                if size > MAX_STREAM_EVENT_SIZE:
                    self._check(size)
        self._data, self._size = data, size
        return events

    def flush(self) -> list[bytes]:
        """Events left when the stream ends without a final blank line."""
        tail = self._tail()
        return self._lines([tail, b""] if tail else [b""])


class _NDJSONDecoder(_LineBuffer):
    """Newline-delimited JSON: bytes in, one non-blank line per value out."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> list[bytes]:
        return [line for line in self._split(chunk) if line.strip()]

    def flush(self) -> list[bytes]:
        tail = self._tail()
        return [tail] if tail.strip() else []


def _stream_error(error: Any) -> StreamError:
    """An error event inside a stream that already answered 200."""
    if not isinstance(error, dict):
        return StreamError(f"error in stream: {error}", provider_message=str(error))
    message = error.get("message") or "an error occurred during streaming"
    return StreamError(f"error in stream: {message}", provider_message=message,
                       error_type=error.get("type"), error_code=error.get("code"))


class _ThinkSplitter:
    """Streamed text with a leading think block split off (the rule of _split_think):
    ``feed`` returns ``(is_reasoning, text)`` pieces as soon as they are certain."""

    __slots__ = ("buffer", "closing", "inside")

    def __init__(self) -> None:
        self.buffer = ""
        self.closing = ""  # set once the opening tag is seen
        self.inside = False

    def feed(self, text: str) -> tuple[list[tuple[bool, str]], bool]:
        """The pieces, and whether the block (or its absence) is settled."""
        self.buffer += text
        if not self.inside:
            head = self.buffer.lstrip()
            tag = next((t for t in _THINK_TAGS if head.startswith(t[0])), None)
            if tag is None:
                if head and not any(t[0].startswith(head) for t in _THINK_TAGS):
                    return [(False, self.buffer)], True  # no think block
                return [], False  # whitespace, or maybe the start of a tag
            self.inside, self.closing, self.buffer = True, tag[1], head[len(tag[0]):]
        end = self.buffer.find(self.closing)
        if end >= 0:
            rest = self.buffer[end + len(self.closing):].lstrip()
            return [(True, self.buffer[:end])] + ([(False, rest)] if rest else []), True
        keep = next((n for n in range(min(len(self.closing), len(self.buffer)), 0, -1)
                     if self.closing.startswith(self.buffer[-n:])), 0)
        out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[
            len(self.buffer) - keep:]
        return ([(True, out)] if out else []), False

    def flush(self) -> list[tuple[bool, str]]:
        return [(self.inside, self.buffer)] if self.buffer else []


class _StreamState:
    """What every provider's stream parser shares: the reply being assembled.

    Subclasses turn decoded frames into text and reasoning chunks; this class keeps
    tool calls (by index), the finish reason, usage and the provider's reasoning
    state, and builds the final chunk with the whole reply. Text of a wrapped schema
    (see ``_wrap_root``) is held back and unwrapped at the end; a leading think block
    in the text is streamed as reasoning when ``split_think`` is set.
    """

    def __init__(self, unwrap: Callable[[str], str] | None = None,
                 split_think: bool = False) -> None:
        # Events that carried something (text, reasoning, a call's piece, a block, usage,
        # the end); keep-alives and empty deltas do not count, so they cannot hold a
        # stalled stream open past its timeout.
        self.progress = 0
        self.calls: dict[Any, list[Any]] = {}  # key -> [id, name, argument pieces]
        self.reason: str | None = None
        self.usage: Usage | None = None
        self.complete = False
        self.state: dict[str, Any] | None = None  # reasoning state, as on AssistantMessage
        self._unwrap = unwrap
        self._held: list[str] = []
        self._texts: list[str] = []
        self._reasoning: list[str] = []
        self._splitter = _ThinkSplitter() if split_think else None
        self._split = False  # a think block was split off the text

    def feed(self, frames: list[bytes]) -> list[StreamChunk]:
        raise NotImplementedError

    def _text(self, out: list[StreamChunk], text: str) -> None:
        self.progress += bool(text)
        if self._splitter is not None:
            pieces, settled = self._splitter.feed(text)
            if settled:
                self._splitter = None
            for is_reasoning, piece in pieces:
                if is_reasoning:
                    self._split = True
                    self._think(out, piece)
                else:
                    self._answer(out, piece)
            return
        self._answer(out, text)

    def _answer(self, out: list[StreamChunk], text: str) -> None:
        self._texts.append(text)
        if self._unwrap is None:
            out.append(_chunk(text))
        else:
            self._held.append(text)

    def _think(self, out: list[StreamChunk], text: str) -> None:
        if text:
            self.progress += 1
            self._reasoning.append(text)
            out.append(_chunk("", reasoning=text))

    def _call(self, key: Any, call_id: str | None, name: str | None, arguments: str) -> None:
        self.progress += bool(call_id or name or arguments)
        entry = self.calls.get(key)
        if entry is None:
            self.calls[key] = [call_id, name, [arguments]]
            return
        entry[0] = entry[0] or call_id
        entry[1] = entry[1] or name
        entry[2].append(arguments)

    def finish(self) -> list[StreamChunk]:
        if not self.complete:
            raise StreamError("the stream ended before the reply was complete")
        out: list[StreamChunk] = []
        if self._splitter is not None:  # the stream ended before the block was settled
            for is_reasoning, piece in self._splitter.flush():
                self._split = self._split or is_reasoning
                (self._think if is_reasoning else self._answer)(out, piece)
        text = "".join(self._texts)
        reasoning = "".join(self._reasoning) or None
        if self._split:  # as chat() splits it
            reasoning, text = _split_think(text if reasoning is None else
                                           f"<think>{reasoning}</think>{text}")
        if self._unwrap is not None:
            text = self._unwrap("".join(self._held)) if self._held else ""
            if self._held:
                out.append(_chunk(text))
        calls = [AssistantToolCall(id=call_id or _new_call_id(),
                                   function=AssistantToolCallFunction(
                                       name=name or "", arguments="".join(parts) or "{}"))
                 for call_id, name, parts in self.calls.values()] or None
        reason = self.reason or ("tool_calls" if calls else "stop")
        message = AssistantMessage(content=text, tool_calls=calls, finish_reason=reason,
                                   reasoning=reasoning, reasoning_state=self.state)
        out.append(_chunk("", reason, calls, self.usage, message=message))
        return out


def _new_call_id() -> str:
    import uuid
    return "call_" + uuid.uuid4().hex[:8]


def _json_frame(frame: bytes) -> Any:
    try:
        return json.loads(frame)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        raise StreamError(f"stream frame is not JSON: {_short(frame)}") from None


class _ChunkedDecoder:
    """HTTP/1.1 chunked transfer coding (RFC 9112 section 7.1): bytes in, payload out.

    ``chunk = size-in-hex [; extensions] CRLF data CRLF``, ended by a zero-size
    chunk, optional trailer lines and a blank line; ``done`` is set at that end.
    Payload is never buffered; what is (a size line, the trailers) is bounded, so
    the work is linear in the input and a hostile framing fails fast.
    """

    __slots__ = ("_buf", "_left", "done")

    def __init__(self) -> None:
        self._buf = b""  # an unfinished size line, CRLF or trailer section
        self._left = 0  # payload bytes left in this chunk; -1: only its closing CRLF
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        out = []
        pos, size, left = 0, len(buf), self._left
        while not self.done:
            if left:  # the rest of a chunk begun in an earlier read
                if left > 0:
                    end = min(size, pos + left)
                    out.append(buf[pos:end])
                    left -= end - pos
                    pos = end
                    if left:
                        break
                    left = -1
                if size - pos < 2:
                    break
                if not buf.startswith(b"\r\n", pos):
                    raise self._bad_end(buf, pos)
                pos, left = pos + 2, 0
            eol = buf.find(b"\r\n", pos)  # linear: the unread data is one read at most
            if eol < 0 or eol - pos > _MAX_CHUNK_LINE:
                if size - pos > _MAX_CHUNK_LINE:
                    raise StreamError(f"bad chunked encoding: a chunk-size line longer than "
                                      f"{_MAX_CHUNK_LINE} bytes")
                break
            digits = buf[pos:eol].split(b";", 1)[0].rstrip(b" \t")
            try:
                # 1*HEXDIG: int() alone would also take "-1", "1_0", " 1" and "0x1"
                if not digits.isalnum() or len(digits) > 16 or digits[1:2] in (b"x", b"X"):
                    raise ValueError
                length = int(digits, 16)
            except ValueError:
                raise StreamError(f"bad chunked encoding: {_short(buf[pos:eol])} is not "
                                  "a chunk size") from None
            if length == 0:
                end = buf.find(b"\r\n\r\n", eol, eol + _MAX_TRAILERS)  # past any trailers
                if end < 0:
                    if size - eol >= _MAX_TRAILERS:
                        raise StreamError(f"bad chunked encoding: trailers longer than "
                                          f"{_MAX_TRAILERS} bytes")
                    break
                self.done, pos = True, end + 4
                break
            end = eol + 2 + length
            if end + 2 > size:  # the chunk goes on in the next read
                pos, left = eol + 2, length
            elif buf.startswith(b"\r\n", end):
                out.append(buf[eol + 2:end])
                pos = end + 2
            else:
                raise self._bad_end(buf, end)
        self._buf, self._left = buf[pos:], left
        return b"".join(out)

    @staticmethod
    def _bad_end(buf: bytes, pos: int) -> StreamError:
        return StreamError(f"bad chunked encoding: {_short(buf[pos:pos + 20])} "
                           "where a chunk should end")


def _body_reader(resp: http.client.HTTPResponse) -> Callable[[], bytes]:
    """A reader of the body that returns all that has arrived, ``b""`` at its end.

    http.client's ``read1`` returns at most one transfer chunk, and servers send
    one frame per chunk: decoding the chunks here takes a whole network read per
    call, so many frames cross to the event loop at once.
    """
    if not resp.chunked or resp.fp is None:
        return functools.partial(resp.read1, 65536)
    import http.client
    decoder, raw = _ChunkedDecoder(), resp.fp

    def read() -> bytes:
        while not decoder.done:
            data = raw.read1(65536)
            if not data:
                raise http.client.IncompleteRead(b"")
            payload = decoder.feed(data)
            if payload:
                return payload
        resp.close()  # read to its end: the connection can go back to the pool
        return b""
    return read


def _stream_batches(req: _Request, decoder: _SSEDecoder | _NDJSONDecoder, state: _StreamState,
                    abort: _Abort | None) -> Generator[list[StreamChunk], None, None]:
    """Read a streamed reply, yielding chunks as each read decodes them.

    ``timeout`` bounds every read, and also the time between meaningful events,
    so a server that sends only keep-alive pings still times out.
    """
    exchange = _open(req, abort)
    read = _body_reader(exchange.response)
    clean = False
    try:
        last = time.monotonic()
        seen = state.progress
        while True:
            try:
                data = read()
            except TimeoutError:
                raise APITimeoutError(f"no data for {req.timeout:g}s from "
                                      f"{_redact_url(req.url)}") from None
            except (OSError, _http_exception()) as exc:
                if abort is not None and abort.aborted:
                    raise _Aborted() from exc
                raise StreamError(f"stream from {_redact_url(req.url)} broke: "
                                  f"{exc!r}") from exc
            if not data:
                break
            batch = state.feed(decoder.feed(data))
            if state.progress != seen:
                seen, last = state.progress, time.monotonic()
            elif req.timeout is not None and time.monotonic() - last > req.timeout:
                raise APITimeoutError(f"no events for {req.timeout:g}s from "
                                      f"{_redact_url(req.url)} (only keep-alives)")
            if batch:
                yield batch
        batch = state.feed(decoder.flush()) + state.finish()
        clean = True
        yield batch
    except APIError as exc:
        _scrub_error(exc, exchange.headers, req.url)
        raise
    finally:
        if clean:
            exchange.finish()
        else:
            exchange.close()


# === 7. Images ===============================================================


def strip_base64_prefix(data: str) -> str:
    """The base64 payload of a ``data:...;base64,`` URI; other strings unchanged."""
    _check_str("strip_base64_prefix", "data", data)
    if data.startswith("data:") and ";base64," in data:
        return data.split(";base64,", 1)[1]
    return data


def add_base64_prefix(base64_data: str, media_type: str = "image/png") -> str:
    """A ``data:`` URI for base64 data."""
    _check_str("add_base64_prefix", "base64_data", base64_data)
    _check_str("add_base64_prefix", "media_type", media_type)
    return f"data:{media_type};base64,{base64_data}"


def _split_data_uri(uri: str) -> tuple[str, str]:
    """``data:image/png;base64,XXXX`` -> (``image/png``, ``XXXX``)."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.endswith(";base64"):
        raise ValidationError(f"image data: URI must be base64-encoded "
                              f"(data:<type>;base64,<data>), got {_short(uri, 60)}",
                              field="source", value=uri)
    return head[5:-7].split(";")[0], payload


def _image_source(image: ImageContent) -> tuple[str, str, str]:
    """One image as (``"url"``, url, type) or (``"base64"``, data, type).

    Base64 arrives as a ``data:`` URI, a dict (whose data may itself carry a
    ``data:`` prefix) or raw text; the media type read from the bytes wins over
    the default ``image/jpeg``, because providers reject a mismatch.
    """
    source, media = image.source, image.media_type
    if isinstance(source, dict):
        data = source.get("data", "")
        media = source.get("media_type") or media
    elif "://" in source[:16] and not source.startswith("data:"):
        return "url", source, media
    else:
        data = source
    if data.startswith("data:"):
        uri_media, data = _split_data_uri(data)
        media = uri_media or media
    return "base64", data, _sniff_media_type(data) or media


_FETCH_HEADERS = {"User-Agent": _USER_AGENT, "Accept": "image/*"}


def _check_address(host: str, port: int, allow_private: bool,
                   via_proxy: bool = False) -> list[str]:
    """The addresses ``host`` resolves to, refused if any is not a public one.

    Behind a proxy a name this machine cannot resolve is left to the proxy (in a
    restricted network only the proxy knows outside names).
    """
    import ipaddress
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        if via_proxy:
            return []
        raise ImageFetchError(f"cannot resolve image host {host!r}: {exc}") from exc
    addresses = []
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        ip = _embedded_ipv4(ipaddress.ip_address(address))
        public = ip.is_global and ip not in _LOCAL_NAT64
        if (not allow_private and not public) or ip.is_multicast or ip.is_unspecified:
            raise ImageFetchError(
                f"refusing to fetch an image from {host!r}: it resolves to {ip}, which is "
                "not a public address (pass allow_private_image_urls=True for images on "
                "your own network)")
        addresses.append(address)
    return addresses


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
                   ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address inside an IPv4-mapped, IPv4-compatible (``::a.b.c.d``),
    IPv4-translated (``::ffff:0:a.b.c.d``), 6to4 or NAT64 (64:ff9b::/96) address:
    Python counts some of them as global, yet they can reach a private IPv4 network."""
    import ipaddress
    if not isinstance(ip, ipaddress.IPv6Address):
        return ip
    inner = ip.ipv4_mapped or ip.sixtofour
    if inner is not None:
        return inner
    value = int(ip)
    if (value >> 32 in (0, 0xFFFF0000) and value > 1) or ip in _NAT64:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return ip


def _network(text: str) -> Any:
    import ipaddress
    return ipaddress.ip_network(text)


_NAT64 = _network("64:ff9b::/96")
# RFC 8215's local-use NAT64 prefix: it translates to whatever IPv4 network the operator
# chose, so nothing in it counts as public, whatever Python's version says.
_LOCAL_NAT64 = _network("64:ff9b:1::/48")


def _image_guard(allow_private: bool) -> Callable[[str, int, bool], str | None]:
    """The transport's guard for image URLs: every hop's host checked, the connection
    pinned to the checked address (behind a proxy, the proxy connects)."""
    def guard(host: str, port: int, via_proxy: bool) -> str | None:
        addresses = _check_address(host, port, allow_private, via_proxy)
        return None if via_proxy else addresses[0]
    return guard


def _fetch_image_blocking(url: str, timeout: float | None = DEFAULT_TIMEOUT,
                          max_size: int = MAX_IMAGE_SIZE, allow_private: bool = False,
                          ssl_context: ssl.SSLContext | None = None,
                          abort: _Abort | None = None) -> tuple[str, str]:
    """Download an image safely: public addresses only, at most 5 checked redirects,
    at most ``max_size`` bytes, an ``image/*`` content type, ``timeout`` per read and
    ``IMAGE_FETCH_DEADLINE`` in all; ``abort`` stops it. Returns (base64, type)."""
    mine = (abort or _Abort()).child()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        mine.abort()

    deadline = IMAGE_FETCH_DEADLINE
    timer = threading.Timer(deadline, expire)
    timer.daemon = True
    timer.start()
    try:
        return _fetch_image(url, timeout, max_size, allow_private, ssl_context, mine)
    except (ImageFetchError, OSError, _Aborted, _http_exception()) as exc:
        if expired.is_set():
            raise ImageFetchError(f"the image download took longer than {deadline:g}s "
                                  "(IMAGE_FETCH_DEADLINE)") from None
        if mine.aborted:
            raise _Aborted() from None
        if isinstance(exc, ImageFetchError):
            raise
        raise ImageFetchError(f"error fetching image: {exc}") from exc
    finally:
        timer.cancel()


def _fetch_image(url: str, timeout: float | None, max_size: int, allow_private: bool,
                 ssl_context: ssl.SSLContext | None, abort: _Abort) -> tuple[str, str]:
    import base64
    if (problem := _url_problem(url)) is not None:
        raise ImageFetchError(f"image URL must be http(s) with a host ({problem}), got "
                              f"{_short(_redact_url(url) if '://' in url else url)}")
    wait = timeout or DEFAULT_TIMEOUT
    req = _Request("GET", url, dict(_FETCH_HEADERS), None, wait, 0, ssl_context,
                   guard=_image_guard(allow_private))
    try:
        exchange = _open(req, abort)
    except APITimeoutError as exc:
        raise ImageFetchError(f"timeout fetching image after {wait:g}s") from exc
    except APIStatusError as exc:
        raise ImageFetchError(f"HTTP error fetching image: {exc.status_code}") from exc
    except APIError as exc:
        raise ImageFetchError(f"error fetching image: {exc}") from exc
    resp, clean = exchange.response, False
    try:
        if resp.status != 200:
            raise ImageFetchError(f"HTTP error fetching image: {resp.status}")
        media = (resp.getheader("content-type") or "").split(";")[0].strip().lower()
        if not media.startswith("image/"):
            raise ImageFetchError(f"the URL did not return an image (content type "
                                  f"{media or 'missing'!r})")
        length = resp.getheader("content-length")
        if length and length.isdigit() and int(length) > max_size:
            raise ImageFetchError(f"image is larger than {max_size} bytes")
        pieces, size = [], 0
        while piece := resp.read1(65536):  # what has come: a drip cannot hold a read
            pieces.append(piece)
            size += len(piece)
            if size > max_size:
                raise ImageFetchError(f"image is larger than {max_size} bytes")
        if abort.aborted:  # the socket was shut: what came is not the whole image
            raise _Aborted()
        clean = True
        return base64.b64encode(b"".join(pieces)).decode("ascii"), media
    except (OSError, _http_exception()) as exc:
        import socket
        if isinstance(exc, (socket.timeout, TimeoutError)) and not abort.aborted:
            raise ImageFetchError(f"timeout fetching image after {wait:g}s") from exc
        raise
    finally:
        if clean:
            exchange.finish()
        else:
            exchange.close()


async def fetch_image_as_base64(url: str, timeout: float = DEFAULT_TIMEOUT,
                                max_size: int = MAX_IMAGE_SIZE, *,
                                allow_private: bool = False) -> tuple[str, str]:
    """Download an image and return ``(base64_data, media_type)``.

    Only http(s) URLs whose host resolves to public addresses are fetched (every
    address and every redirect is checked; ``allow_private=True`` lifts that for
    images on your own network); the body is capped at ``max_size`` bytes and must
    be an image.
    """
    if not isinstance(allow_private, bool):  # "false" would be true
        _fail("fetch_image_as_base64", "allow_private", "True or False", allow_private)
    return await _run_blocking(lambda abort: _fetch_image_blocking(
        url, timeout, max_size, allow_private, abort=abort))


def _parallel(jobs: list[Callable[[], _T]], limit: int) -> list[_T]:
    """Run blocking jobs on the workers, at most ``limit`` at once; after the first
    failure no new job starts, and that failure is raised."""
    if len(jobs) <= 1:
        return [job() for job in jobs]
    results: list[Any] = [None] * len(jobs)
    slots = threading.Semaphore(max(1, limit))
    failed = threading.Event()

    def run(i: int, job: Callable[[], _T]) -> None:
        try:
            results[i] = (True, job())
        except BaseException as exc:
            results[i] = (False, exc)
            failed.set()
        slots.release()

    started = 0
    for i, job in enumerate(jobs):
        slots.acquire()
        if failed.is_set():
            slots.release()
            break
        _workers.submit(functools.partial(run, i, job))
        started += 1
    for _ in range(max(1, limit)):  # every started job has given its slot back
        slots.acquire()
    for ok, value in results[:started]:
        if not ok:
            raise value
    return [value for _, value in results]


# === 8. Wire format: OpenAI ==================================================


def _image_to_openai(image: ImageContent) -> dict[str, Any]:
    kind, value, media = _image_source(image)
    url = value if kind == "url" else add_base64_prefix(value, media)
    return {"type": "image_url", "image_url": {"url": url}}


def _message_to_openai(message: ChatMessage, reasoning: bool = True) -> dict[str, Any]:
    """One message; ``reasoning`` sends thinking back on assistant turns (the servers that
    return it want it: DeepSeek refuses a tool-call turn without it)."""
    if isinstance(message, UserMessage) and isinstance(message.content, list):
        parts = [{"type": "text", "text": p.text} if isinstance(p, TextContent)
                 else _image_to_openai(p) for p in message.content]
        return {"role": "user", "content": parts}
    if isinstance(message, AssistantMessage):
        out: dict[str, Any] = {"role": "assistant", "content": message.content}
        if reasoning:
            _reasoning_to_openai(message, out)
        if message.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name,
                                               "arguments": c.function.arguments}}
                                 for c in message.tool_calls]
        return out
    if isinstance(message, ToolResultMessage):
        # OpenAI's tool message has no "name" (upstream sent one; strict servers refuse it).
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    return {"role": message.role, "content": message.content}


# The fields servers return thinking in: reasoning_content (DeepSeek, llama.cpp, LM
# Studio), reasoning (vLLM since late 2025, OpenRouter, Ollama's /v1); OpenRouter adds
# reasoning_details, the provider's state, to be sent back unmodified.
_REASONING_FIELDS_OPENAI = ("reasoning_content", "reasoning")


def _reasoning_to_openai(message: AssistantMessage, out: dict[str, Any]) -> None:
    state = message.reasoning_state or {}
    ours = state.get("provider") == "openai"  # another provider's state never goes out
    if message.reasoning:
        out[state.get("field", "reasoning_content") if ours else "reasoning_content"] = (
            message.reasoning)
    if ours and state.get("details"):
        out["reasoning_details"] = state["details"]


def _reasoning_from_openai(message: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The thinking of a reply (or of a stream delta) and the state to send back."""
    field = next((f for f in _REASONING_FIELDS_OPENAI if isinstance(message.get(f), str)
                  and message[f]), None)
    details = message.get("reasoning_details")
    if field is None and not details:
        return None, None
    state: dict[str, Any] = {"provider": "openai", "field": field or "reasoning"}
    if isinstance(details, list) and details:
        state["details"] = details
    return (message[field] if field else None), state


def _merge_details(details: list[Any], pieces: list[Any]) -> None:
    """Streamed reasoning_details: pieces with the same index extend one entry's text."""
    for piece in pieces:
        if not isinstance(piece, dict):
            continue
        entry = next((d for d in details if d.get("index") == piece.get("index")
                      and d.get("type") == piece.get("type")), None)
        if entry is None:
            details.append(dict(piece))
            continue
        for key, value in piece.items():
            if key in ("text", "summary", "data") and isinstance(value, str):
                entry[key] = entry.get(key, "") + value
            elif value is not None:
                entry[key] = value


def convert_messages_to_openai(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages in OpenAI Chat Completions form (every system message kept in place;
    an assistant turn's thinking goes back as ``reasoning_content``)."""
    return _messages_to_openai(_check_messages(messages))


def _messages_to_openai(messages: list[ChatMessage], reasoning: bool = True
                        ) -> list[dict[str, Any]]:
    return [_message_to_openai(m, reasoning) for m in messages]


def convert_tool_calls_from_openai(tool_calls: Iterable[Any]) -> list[AssistantToolCall]:
    """OpenAI tool calls (dicts or SDK objects) as ``AssistantToolCall``s; arguments untouched."""
    _check_iterable("convert_tool_calls_from_openai", "tool_calls", tool_calls)
    out = []
    for call in tool_calls:
        function = _get(call, "function") or {}
        arguments = _get(function, "arguments")
        out.append(AssistantToolCall(
            id=_get(call, "id") or _new_call_id(),
            function=AssistantToolCallFunction(
                name=_get(function, "name") or "",
                arguments=arguments if isinstance(arguments, str)
                else json.dumps(arguments or {}))))
    return out


def tool_to_openai(tool: Tool) -> dict[str, Any]:
    """A tool in OpenAI's ``{"type": "function", "function": {...}}`` form."""
    tool = _coerce("tool_to_openai", "tool", tool, Tool)
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": tool.input_schema}}


def tools_to_openai(tools: list[Tool]) -> list[dict[str, Any]]:
    """Several tools in OpenAI form."""
    return [tool_to_openai(t) for t in _check_tools("tools_to_openai", "tools", tools)]


# Sampling options Chat Completions takes under their own names.
_SAMPLING_OPENAI = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed",
                    "stop")


# The budget a reasoning effort stands for, where an API takes budgets (and back).
_EFFORT_BUDGETS = {"low": 2048, "medium": 8192, "high": 24576}
# Raw fields of each server's own reasoning control: given as extras, they win.
_RAW_REASONING_OPENAI = frozenset({"reasoning_effort", "reasoning", "chat_template_kwargs",
                                   "thinking_token_budget", "reasoning_budget_tokens",
                                   "thinking"})


def _effort(reasoning: bool | str | int) -> str:
    """An effort for APIs that take only efforts: a budget maps to the nearest one."""
    if isinstance(reasoning, str):
        return reasoning
    if reasoning is True:
        return "medium"
    return next((e for e, b in _EFFORT_BUDGETS.items() if reasoning <= b), "high")


def _reasoning_options_openai(reasoning: bool | str | int, body: dict[str, Any],
                              dialect: str) -> None:
    """The reasoning knob in each OpenAI-compatible server's documented form."""
    if dialect == "openai":  # reasoning_effort; "none" on the models that can skip it
        body["reasoning_effort"] = "none" if reasoning is False else _effort(reasoning)
    elif dialect == "openrouter":  # its unified "reasoning" object
        body["reasoning"] = ({"enabled": False} if reasoning is False else
                             {"enabled": True} if reasoning is True else
                             {"effort": reasoning} if isinstance(reasoning, str) else
                             {"max_tokens": reasoning})
    elif reasoning is False:
        # llama.cpp: reasoning_effort "none"; vLLM and llama.cpp templates (Qwen3...):
        # enable_thinking in chat_template_kwargs.
        body["reasoning_effort"] = "none"
        body["chat_template_kwargs"] = {"enable_thinking": False}
    elif isinstance(reasoning, str):
        body["reasoning_effort"] = reasoning
    elif reasoning is True:
        body["chat_template_kwargs"] = {"enable_thinking": True}
    else:  # vLLM's thinking_token_budget, llama.cpp's reasoning_budget_tokens
        body["thinking_token_budget"] = body["reasoning_budget_tokens"] = reasoning


def _options_to_openai(options: ChatOptions, body: dict[str, Any], dialect: str) -> list[str]:
    """The portable options in Chat Completions form; returns the names left out."""
    left_out = []
    official = dialect == "openai"
    if options.reasoning is not None and _RAW_REASONING_OPENAI.isdisjoint(options.extra):
        _reasoning_options_openai(options.reasoning, body, dialect)
    for name in _SAMPLING_OPENAI:
        value = getattr(options, name)
        if value is not None:
            body[name] = value
    if options.top_k is not None:
        # api.openai.com refuses fields it does not know (HTTP 400); vLLM, llama.cpp
        # and LM Studio take top_k.
        if official:
            left_out.append("top_k")
        else:
            body["top_k"] = options.top_k
    choice = options.tool_choice
    if body.get("tools"):
        if choice is not None:
            body["tool_choice"] = choice if choice in _TOOL_CHOICES else {
                "type": "function", "function": {"name": choice}}
        if options.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = options.parallel_tool_calls
    else:  # both are refused without tools ("only allowed when 'tools' are specified")
        left_out += ["tool_choice"] * (choice not in (None, "auto", "none"))
        left_out += ["parallel_tool_calls"] * (options.parallel_tool_calls is not None)
    return left_out


def _usage_from_openai(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens_details")
    prompt = prompt if isinstance(prompt, dict) else {}
    completion = usage.get("completion_tokens_details")
    completion = completion if isinstance(completion, dict) else {}
    cached = prompt.get("cached_tokens")
    if cached is None:  # DeepSeek reports its cache hits beside the prompt count
        cached = usage.get("prompt_cache_hit_tokens")
    # prompt_tokens already includes the cached tokens; cache_write_tokens is OpenRouter's.
    return _usage(usage.get("prompt_tokens"), usage.get("completion_tokens"), cached,
                  prompt.get("cache_write_tokens"), completion.get("reasoning_tokens"))


def _finish_from_openai(reason: Any, has_calls: bool) -> str:
    return reason if isinstance(reason, str) and reason else (
        "tool_calls" if has_calls else "stop")


def _request_openai(call: _Call, messages: list[ChatMessage], stream: bool,
                    dialect: str) -> tuple[dict[str, Any], list[str]]:
    """The Chat Completions body, and the options it leaves out; ``dialect`` is
    ``"openai"`` (api.openai.com), ``"openrouter"`` or ``"compatible"``."""
    options, fmt = call.options, call.fmt
    official = dialect == "openai"
    body: dict[str, Any] = {"model": call.model,
                            # api.openai.com neither returns thinking here nor takes it
                            "messages": _messages_to_openai(messages, not official)}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if options.max_tokens is not None:
        # The official API deprecated max_tokens (reasoning models reject it); other
        # servers may only know max_tokens.
        body["max_completion_tokens" if official else "max_tokens"] = options.max_tokens
    if options.tools:
        body["tools"] = tools_to_openai(options.tools)
    left_out = _options_to_openai(options, body, dialect)
    if fmt.kind == "json":
        body["response_format"] = {"type": "json_object"}
        if not any("json" in json.dumps(m["content"]).lower() for m in body["messages"]):
            # The API refuses json_object unless a message mentions JSON (HTTP 400).
            body["messages"].insert(0, {"role": "system", "content": _JSON_INSTRUCTION})
    elif fmt.wire_schema is not None:
        spec: dict[str, Any] = {"name": fmt.name, "schema": fmt.wire_schema}
        if _openai_strict_ok(fmt.wire_schema):
            spec["strict"] = True
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    return body, left_out


def _reply_from_openai(body: Any, fmt: _ResponseFormat, split_think: bool = False
                       ) -> tuple[AssistantMessage, Usage | None]:
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices:
        raise APIError(f"the reply has no choices: {_short(body, 200)}", body=body)
    choice = choices[0]
    message = choice.get("message") or {}
    calls = message.get("tool_calls")
    content = message.get("content") or ""
    reasoning, state = _reasoning_from_openai(message)
    if split_think and reasoning is None:
        reasoning, content = _split_think(content)
    if fmt.unwrap is not None:
        content = fmt.unwrap(content)
    return (AssistantMessage(
        content=content,
        tool_calls=convert_tool_calls_from_openai(calls) if calls else None,
        finish_reason=_finish_from_openai(choice.get("finish_reason"), bool(calls)),
        reasoning=reasoning, reasoning_state=state),
        _usage_from_openai(body.get("usage")))


_PLAIN_DELTA_OPENAI = frozenset({"role", "content", "tool_calls", "refusal", "function_call"})


class _OpenAIStream(_StreamState):
    """Chat Completions chunks: text deltas, tool-call fragments by index, the finish
    reason on a late chunk, usage on a last chunk with no choices, then ``[DONE]``."""

    def feed(self, frames: list[bytes]) -> list[StreamChunk]:
        out: list[StreamChunk] = []
        for frame in frames:
            if frame.startswith(b"[DONE]"):
                self.complete = True
                self.progress += 1
                continue
            event = _json_frame(frame)
            if not isinstance(event, dict):
                continue
            if event.get("error"):
                raise _stream_error(event["error"])
            if event.get("usage"):
                self.usage = _usage_from_openai(event["usage"])
                self.progress += 1
            choices = event.get("choices")
            if not choices:
                continue
            choice = choices[0]
            if choice.get("index", 0) != 0:  # n > 1: the reply is the first choice
                continue
            delta = choice.get("delta") or {}
            if delta.keys() - _PLAIN_DELTA_OPENAI:
                self._reasoning_delta(out, delta)
            text = delta.get("content")
            if text:
                self._text(out, text)
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                arguments = function.get("arguments") or ""
                self._call(call.get("index", len(self.calls)), call.get("id"),
                           function.get("name"),
                           arguments if isinstance(arguments, str) else json.dumps(arguments))
            if choice.get("finish_reason"):
                self.reason = choice["finish_reason"]
                self.complete = True  # some servers end without [DONE]
                self.progress += 1
        return out

    def _reasoning_delta(self, out: list[StreamChunk], delta: dict[str, Any]) -> None:
        text, state = _reasoning_from_openai(delta)
        if state is None:
            return
        if self.state is None:
            self.state = {"provider": "openai", "field": state["field"]}
        if text:
            self.state["field"] = state["field"]
            self._think(out, text)
        if "details" in state:  # signed or encrypted reasoning: content without text
            self.progress += 1
            _merge_details(self.state.setdefault("details", []), state["details"])


def _model_names(body: Any, list_key: str, name_key: str) -> list[ModelName]:
    """``body[list_key]``, a list of model records, as names keeping their record."""
    items = body.get(list_key) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise APIError(f"the reply lists no models: {_short(body, 200)}", body=body)
    return [ModelName(item[name_key], item) for item in items
            if isinstance(item, dict) and isinstance(item.get(name_key), str)]


def _models_from_openai(body: Any) -> list[ModelName]:
    # GET /models: {"object": "list", "data": [{"id", "object": "model", "created",
    # "owned_by"}]} (openai-python types/model.py); llama.cpp adds "meta" per model.
    return _model_names(body, "data", "id")


def _embedding_request_openai(model: str, texts: list[str]) -> dict[str, Any]:
    # POST /embeddings: {"model", "input": [str]}; "dimensions", "encoding_format" and
    # "user" are optional (openai-python types/embedding_create_params.py).
    return {"model": model, "input": texts}


def _vectors(raw: Any, count: int, body: Any) -> list[list[float]]:
    """``count`` embeddings, each a list of numbers (or base64 of little-endian float32s,
    which ``encoding_format="base64"`` asks for)."""
    if not isinstance(raw, list) or len(raw) != count:
        got = len(raw) if isinstance(raw, list) else "none"
        raise APIError(f"asked for {count} embeddings, the reply has {got}: "
                       f"{_short(body, 200)}", body=body)
    vectors = []
    for vector in raw:
        try:
            if isinstance(vector, str):
                import base64
                import struct
                data = base64.b64decode(vector, validate=True)
                if len(data) % 4:
                    raise ValueError("not a whole number of float32s")
                vector = struct.unpack(f"<{len(data) // 4}f", data)
            vectors.append([float(x) for x in vector])  # Go writes a float 0 as 0
        except (TypeError, ValueError):
            raise APIError(f"an embedding is not a list of numbers: {_short(vector)}",
                           body=body) from None
    return vectors


def _embeddings_from_openai(body: Any, count: int) -> tuple[list[list[float]], Usage | None]:
    # {"object": "list", "data": [{"object": "embedding", "index", "embedding": [...]}],
    # "model", "usage": {"prompt_tokens", "total_tokens"}}
    # (openai-python types/create_embedding_response.py, types/embedding.py).
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise APIError(f"the reply has no embeddings: {_short(body, 200)}", body=body)
    # "index" names the input of each item: order by it rather than trust the list order.
    data = sorted(data, key=lambda item: item.get("index") or 0)
    return (_vectors([item.get("embedding") for item in data], count, body),
            _usage_from_openai(body.get("usage")))


# === 9. Wire format: Ollama ==================================================

# Model parameters Ollama reads from "options" rather than the top level.
_OLLAMA_OPTIONS = frozenset({
    "num_ctx", "num_predict", "num_keep", "num_batch", "num_gpu", "num_thread", "seed",
    "top_k", "top_p", "min_p", "typical_p", "tfs_z", "repeat_last_n", "repeat_penalty",
    "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
    "penalize_newline", "stop", "temperature", "numa", "low_vram", "use_mmap", "use_mlock"})


def _message_to_ollama(message: ChatMessage, images: dict[str, str]) -> dict[str, Any]:
    """One message; ``images`` maps each image URL to its already-fetched base64."""
    if isinstance(message, UserMessage) and isinstance(message.content, list):
        texts, data = [], []
        for part in message.content:
            if isinstance(part, TextContent):
                texts.append(part.text)
            else:
                kind, value, _ = _image_source(part)
                data.append(images[value] if kind == "url" else value)
        out: dict[str, Any] = {"role": "user", "content": "\n".join(texts)}
        if data:
            out["images"] = data
        return out
    if isinstance(message, AssistantMessage):
        out = {"role": "assistant", "content": message.content or ""}
        if message.reasoning:  # /api/chat takes the thinking back on assistant turns
            out["thinking"] = message.reasoning
        if message.tool_calls:
            out["tool_calls"] = [{"id": c.id, "function": {
                "name": c.function.name, "arguments": _arguments_object(c.function)}}
                for c in message.tool_calls]
        return out
    if isinstance(message, ToolResultMessage):
        return {"role": "tool", "content": message.content, "tool_name": message.name,
                "tool_call_id": message.tool_call_id}
    return {"role": message.role, "content": message.content or ""}


def _image_urls(messages: list[ChatMessage]) -> list[str]:
    urls = []
    for message in messages:
        if isinstance(message, UserMessage) and isinstance(message.content, list):
            for part in message.content:
                if isinstance(part, ImageContent):
                    kind, value, _ = _image_source(part)
                    if kind == "url" and value not in urls:
                        urls.append(value)
    return urls


async def convert_messages_to_ollama(messages: list[ChatMessage], *,
                                     allow_private_image_urls: bool = False
                                     ) -> list[dict[str, Any]]:
    """Messages in Ollama ``/api/chat`` form; image URLs are downloaded (safely) and
    sent as base64, tool results carry ``tool_name`` and ``tool_call_id``."""
    checked = _check_messages(messages)
    if not isinstance(allow_private_image_urls, bool):
        _fail("convert_messages_to_ollama", "allow_private_image_urls", "True or False",
              allow_private_image_urls)
    if not _image_urls(checked):
        return [_message_to_ollama(m, {}) for m in checked]
    return await _run_blocking(lambda abort: _messages_to_ollama(
        checked, allow_private_image_urls, abort=abort))


def _messages_to_ollama(messages: list[ChatMessage], allow_private: bool = False,
                        ssl_context: ssl.SSLContext | None = None,
                        fetch: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
                        abort: _Abort | None = None) -> list[dict[str, Any]]:
    """The blocking converter: image URLs are fetched in parallel on the workers,
    ``MAX_PARALLEL_IMAGE_FETCHES`` at once (``fetch=False``, for a dry run, leaves a
    placeholder naming the URL); the messages are already checked."""
    checked = messages
    urls = _image_urls(checked)
    if not fetch:
        images = {url: f"<base64 of {_redact_url(url)}, fetched when sent>" for url in urls}
        return [_message_to_ollama(m, images) for m in checked]
    parent = abort or _Abort()
    fetched = _parallel([functools.partial(_fetch_image_blocking, url, timeout,
                                           MAX_IMAGE_SIZE, allow_private, ssl_context, parent)
                         for url in urls], MAX_PARALLEL_IMAGE_FETCHES)
    images = {url: data for url, (data, _) in zip(urls, fetched, strict=True)}
    return [_message_to_ollama(m, images) for m in checked]


def convert_tool_calls_from_ollama(tool_calls: Iterable[Any]) -> list[AssistantToolCall]:
    """Ollama tool calls (arguments as objects) as ``AssistantToolCall``s; ids are made
    up when an older server sent none."""
    _check_iterable("convert_tool_calls_from_ollama", "tool_calls", tool_calls)
    out = []
    for call in tool_calls:
        function = _get(call, "function") or {}
        arguments = _get(function, "arguments")
        out.append(AssistantToolCall(
            id=_get(call, "id") or _new_call_id(),
            function=AssistantToolCallFunction(
                name=_get(function, "name") or "",
                arguments=arguments if isinstance(arguments, str)
                else json.dumps(arguments) if arguments else "{}")))
    return out


def tool_to_ollama(tool: Tool) -> dict[str, Any]:
    """A tool in Ollama form (the same as OpenAI's; the whole schema is kept)."""
    return tool_to_openai(tool)


def tools_to_ollama(tools: list[Tool]) -> list[dict[str, Any]]:
    """Several tools in Ollama form."""
    return [tool_to_ollama(t) for t in _check_tools("tools_to_ollama", "tools", tools)]


# Sampling options Ollama reads from "options" under the portable names.
_SAMPLING_OLLAMA = ("temperature", "top_p", "top_k", "seed", "stop", "frequency_penalty",
                    "presence_penalty")


def _options_to_ollama(options: ChatOptions, body: dict[str, Any]) -> list[str]:
    """The portable options in ``/api/chat`` form; returns the names left out."""
    sampling = body["options"]
    for name in _SAMPLING_OLLAMA:
        value = getattr(options, name)
        if value is not None:
            sampling[name] = value
    reasoning = options.reasoning
    if reasoning is not None and "think" not in options.extra:
        # think: true/false, or a level for the models that take one (gpt-oss:
        # docs/capabilities/thinking.mdx); no budget.
        body["think"] = (reasoning if isinstance(reasoning, bool) else
                         reasoning if isinstance(reasoning, str) and "gpt-oss" in body["model"]
                         else True)
    # Ollama has no tool_choice: "none" is kept by sending no tools, the others can't be.
    left_out = ["tool_choice"] * (options.tool_choice not in (None, "auto", "none"))
    left_out += ["reasoning budget"] * (isinstance(reasoning, int) and not isinstance(
        reasoning, bool) and "think" not in options.extra)
    return left_out + ["parallel_tool_calls"] * (options.parallel_tool_calls is not None)


def _usage_from_ollama(body: dict[str, Any]) -> Usage:
    # Ollama omits counts that are 0 (omitempty), e.g. a fully cached prompt.
    return _usage(body.get("prompt_eval_count"), body.get("eval_count"))


def _finish_from_ollama(reason: Any, has_calls: bool) -> str:
    if has_calls and reason in (None, "", "stop"):
        return "tool_calls"
    return reason or "stop"


def _request_ollama(call: _Call, messages: list[dict[str, Any]], stream: bool
                    ) -> tuple[dict[str, Any], list[str]]:
    """The ``/api/chat`` body (``messages`` already in wire form), and the options it
    leaves out."""
    options, fmt = call.options, call.fmt
    body: dict[str, Any] = {"model": call.model, "messages": messages, "stream": stream,
                            "options": {}}
    if options.max_tokens is not None:
        body["options"]["num_predict"] = options.max_tokens
    if options.tools and options.tool_choice != "none":
        body["tools"] = tools_to_ollama(options.tools)
    left_out = _options_to_ollama(options, body)
    if fmt.kind == "json":
        body["format"] = "json"
    elif fmt.kind == "schema":
        body["format"] = fmt.schema
    return body, left_out


def _reply_from_ollama(body: Any, fmt: _ResponseFormat, split_think: bool = False
                       ) -> tuple[AssistantMessage, Usage | None]:
    if not isinstance(body, dict):
        raise APIError(f"unexpected Ollama reply: {_short(body, 200)}", body=body)
    message = body.get("message") or {}
    calls = message.get("tool_calls")
    content = message.get("content") or ""
    reasoning = message.get("thinking") or None  # message.thinking (thinking.mdx)
    if split_think and reasoning is None:
        reasoning, content = _split_think(content)
    return (AssistantMessage(
        content=content,
        tool_calls=convert_tool_calls_from_ollama(calls) if calls else None,
        finish_reason=_finish_from_ollama(body.get("done_reason"), bool(calls)),
        reasoning=reasoning), _usage_from_ollama(body))


class _OllamaStream(_StreamState):
    """NDJSON objects: thinking in ``message.thinking``, text in ``message.content``,
    whole tool calls, then ``done``."""

    def feed(self, frames: list[bytes]) -> list[StreamChunk]:
        out: list[StreamChunk] = []
        for frame in frames:
            event = _json_frame(frame)
            if not isinstance(event, dict):
                continue
            if event.get("error"):
                raise _stream_error(event["error"])
            message = event.get("message") or {}
            if message.get("thinking"):
                self._think(out, message["thinking"])
            if message.get("content"):
                self._text(out, message["content"])
            if message.get("tool_calls"):
                for call in convert_tool_calls_from_ollama(message["tool_calls"]):
                    self._call(len(self.calls), call.id, call.function.name,
                               call.function.arguments)
            if event.get("done"):
                self.complete = True
                self.progress += 1
                self.usage = _usage_from_ollama(event)
                self.reason = _finish_from_ollama(event.get("done_reason"), bool(self.calls))
        return out


def _models_from_ollama(body: Any) -> list[ModelName]:
    # GET /api/tags: {"models": [{"name", "model", "modified_at", "size", "digest",
    # "details": {"format", "family", "parameter_size", "quantization_level", ...}}]}
    # (ollama docs/api.md "List Local Models", api/types.go ListModelResponse).
    return _model_names(body, "models", "name")


def _embedding_request_ollama(model: str, texts: list[str]) -> dict[str, Any]:
    # POST /api/embed: {"model", "input": str | [str], "truncate", "dimensions",
    # "keep_alive", "options"} (ollama docs/api.md "Generate Embeddings", api/types.go
    # EmbedRequest); "options" is where extras such as num_ctx go.
    return {"model": model, "input": texts, "options": {}}


def _embeddings_from_ollama(body: Any, count: int) -> tuple[list[list[float]], Usage | None]:
    # {"model", "embeddings": [[...], ...], "total_duration", "load_duration",
    # "prompt_eval_count"} (api/types.go EmbedResponse; the counts are omitempty).
    if not isinstance(body, dict):
        raise APIError(f"unexpected Ollama reply: {_short(body, 200)}", body=body)
    return (_vectors(body.get("embeddings"), count, body),
            _usage(body.get("prompt_eval_count"), 0))


# === 10. Wire format: Anthropic ==============================================

_ANSWER_TOOL = "structured_answer"  # the forced tool that carries a schema's answer
_ANSWER_INSTRUCTION = f"Give your final answer by calling the {_ANSWER_TOOL} tool."
_STOP_REASONS_ANTHROPIC = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                           "tool_use": "tool_calls", "refusal": "content_filter",
                           "model_context_window_exceeded": "length"}


def _image_to_anthropic(image: ImageContent) -> dict[str, Any]:
    kind, value, media = _image_source(image)
    if kind == "url":
        return {"type": "image", "source": {"type": "url", "url": value}}
    return {"type": "image", "source": {"type": "base64", "media_type": media, "data": value}}


def _blocks_to_anthropic(message: ChatMessage) -> list[dict[str, Any]]:
    """A message's content blocks; empty text is left out (the API rejects it)."""
    blocks: list[dict[str, Any]] = []
    if isinstance(message, UserMessage) and isinstance(message.content, list):
        for part in message.content:
            if isinstance(part, ImageContent):
                blocks.append(_image_to_anthropic(part))
            elif part.text.strip():
                blocks.append({"type": "text", "text": part.text})
        return blocks
    if isinstance(message, ToolResultMessage):
        result = {"type": "tool_result", "tool_use_id": message.tool_call_id,
                  "content": message.content}
        return [{**result, "is_error": True} if message.is_error else result]
    state = message.reasoning_state if isinstance(message, AssistantMessage) else None
    if state and state.get("provider") == "anthropic":
        # Thinking blocks lead the turn, unmodified and in order: the API checks their
        # signatures and refuses a tool-use turn without them. Text alone (from another
        # provider) cannot be sent back as thinking.
        blocks += [dict(b) for b in state.get("blocks") or ()]
    if isinstance(message.content, str) and message.content.strip():
        blocks.append({"type": "text", "text": message.content})
    if isinstance(message, AssistantMessage):
        for call in message.tool_calls or ():
            blocks.append({"type": "tool_use", "id": call.id, "name": call.function.name,
                           "input": _arguments_object(call.function)})
    return blocks


def convert_messages_to_anthropic(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages in Anthropic Messages form, without the system messages.

    Tool results become ``tool_result`` blocks in a user turn (the results of one
    assistant turn share one user message); messages left with no content are
    dropped, since the API rejects empty text and empty turns.
    """
    return _messages_to_anthropic(_check_messages(messages))


def _messages_to_anthropic(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    previous_was_result = False
    for message in messages:
        if isinstance(message, SystemMessage):
            continue
        blocks = _blocks_to_anthropic(message)
        is_result = isinstance(message, ToolResultMessage)
        if is_result and previous_was_result:
            out[-1]["content"].extend(blocks)
        elif blocks:
            out.append({"role": "assistant" if isinstance(message, AssistantMessage)
                        else "user", "content": blocks})
        previous_was_result = is_result
    return out


def extract_system_message(messages: list[ChatMessage]) -> str | None:
    """The first system message's text, or ``None`` (upstream's helper)."""
    for message in _check_messages(messages):
        if isinstance(message, SystemMessage):
            return message.content
    return None


def extract_system_messages(messages: list[ChatMessage]) -> list[dict[str, Any]] | None:
    """Every non-empty system message as Anthropic ``system`` text blocks, or ``None``
    (upstream 0.8's successor of ``extract_system_message``)."""
    blocks = [{"type": "text", "text": m.content} for m in _check_messages(messages)
              if isinstance(m, SystemMessage) and m.content.strip()]
    return blocks or None


def _system_to_anthropic(messages: list[ChatMessage], extra: list[str]) -> Any:
    """Every system message (not only the first), plus instructions casual_llm adds."""
    texts = [m.content for m in messages if isinstance(m, SystemMessage) and m.content.strip()]
    texts += extra
    if len(texts) <= 1:
        return texts[0] if texts else None
    return [{"type": "text", "text": t} for t in texts]


def convert_tool_calls_from_anthropic(blocks: Iterable[Any]) -> list[AssistantToolCall]:
    """Anthropic ``tool_use`` blocks (dicts or SDK objects) as ``AssistantToolCall``s."""
    _check_iterable("convert_tool_calls_from_anthropic", "blocks", blocks)
    out = []
    for block in blocks:
        arguments = _get(block, "input")
        out.append(AssistantToolCall(
            id=_get(block, "id") or _new_call_id(),
            function=AssistantToolCallFunction(
                name=_get(block, "name") or "",
                arguments=json.dumps(arguments) if arguments else "{}")))
    return out


def tool_to_anthropic(tool: Tool) -> dict[str, Any]:
    """A tool in Anthropic form (``input_schema``)."""
    tool = _coerce("tool_to_anthropic", "tool", tool, Tool)
    return {"name": tool.name, "description": tool.description,
            "input_schema": tool.input_schema}


def tools_to_anthropic(tools: list[Tool]) -> list[dict[str, Any]]:
    """Several tools in Anthropic form."""
    return [tool_to_anthropic(t) for t in _check_tools("tools_to_anthropic", "tools", tools)]


# Sampling options the Messages API takes under their own names (stop is stop_sequences).
_SAMPLING_ANTHROPIC = ("temperature", "top_p", "top_k")
# Options the Messages API refuses (an unknown field is HTTP 400).
_REFUSED_ANTHROPIC = ("seed", "frequency_penalty", "presence_penalty")


def _tool_choice_to_anthropic(options: ChatOptions, schema: bool, thinking: bool
                              ) -> tuple[dict[str, Any] | None, list[str]]:
    """``tool_choice`` in Messages form, and what it leaves out. With a schema an answer
    (the answer tool) or one of the user's tools is always called, except with thinking
    on: the API refuses forced tool use then ("Thinking may not be enabled when
    tool_choice forces tool use"), so the model chooses and is told to answer in the tool."""
    choice, tools = options.tool_choice, options.tools
    if thinking:
        if choice in ("required",) or choice not in (None, *_TOOL_CHOICES):
            return ({"type": "auto"} if schema else None), ["tool_choice (with thinking on)"]
        if schema or choice == "auto":
            return {"type": "auto"}, []
        return ({"type": "none"} if choice == "none" else None), []
    if schema:
        if not tools or choice == "none":
            return {"type": "tool", "name": _ANSWER_TOOL}, []
        if choice not in (None, *_TOOL_CHOICES):
            return {"type": "tool", "name": choice}, []
        return {"type": "any"}, []
    if choice is None:
        return None, []
    return {"auto": {"type": "auto"}, "required": {"type": "any"},
            "none": {"type": "none"}}.get(choice) or {"type": "tool", "name": choice}, []


def _options_to_anthropic(options: ChatOptions, body: dict[str, Any], schema: bool,
                          thinking: bool = False) -> list[str]:
    """The portable options in Messages form; returns the names left out."""
    left_out = []
    for name in _SAMPLING_ANTHROPIC:
        value = getattr(options, name)
        if value is None:
            continue
        # With thinking on, the API takes no temperature or top_k, and top_p only
        # from 0.95 to 1 (extended thinking, "Feature compatibility").
        if thinking and not (name == "top_p" and 0.95 <= value <= 1):
            left_out.append(f"{name} (with thinking on)")
        else:
            body[name] = value
    if options.stop is not None:
        body["stop_sequences"] = options.stop
    left_out += [name for name in _REFUSED_ANTHROPIC if getattr(options, name) is not None]
    choice, refused = _tool_choice_to_anthropic(options, schema, thinking)
    left_out += refused
    if options.parallel_tool_calls is False:
        if "tools" in body and (choice or {}).get("type") != "none":
            choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        elif "tools" not in body:
            left_out.append("parallel_tool_calls")
    if choice is not None:
        if "tools" in body:
            body["tool_choice"] = choice
        elif choice["type"] not in ("auto", "none"):
            left_out.append("tool_choice")
    return left_out


# Which Claude models think how (the adaptive-thinking and extended-thinking guides):
# adaptive thinking ({"type": "adaptive"} with output_config.effort) from Opus and
# Sonnet 4.6 on; only adaptive, and never off, on Opus 4.7, Mythos and Fable; on by
# default from the 5 generation; older models take a budget ({"type": "enabled",
# "budget_tokens" >= 1024, below max_tokens}).
_ADAPTIVE_ONLY_ANTHROPIC = re.compile(r"opus-4-7|mythos|fable")
_MIN_BUDGET_ANTHROPIC = 1024
_THINKING_MAX_TOKENS = 16000  # the default max_tokens with thinking: room for both


def _claude_version(model: str) -> tuple[int, int]:
    found = re.search(r"(?:opus|sonnet|haiku)-(\d+)(?:-(\d)(?!\d))?", model)
    return (int(found.group(1)), int(found.group(2) or 0)) if found else (0, 0)


def _thinking_to_anthropic(model: str, reasoning: bool | str | int
                           ) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """``(thinking, output_config effort, left out)`` for the reasoning knob: an effort
    where the model thinks adaptively, a budget where it takes one."""
    always = bool(_ADAPTIVE_ONLY_ANTHROPIC.search(model))
    adaptive = always or _claude_version(model) >= (4, 6)
    if reasoning is False:
        if always:
            return None, None, ["reasoning=False (this model always thinks)"]
        return {"type": "disabled"}, None, []
    if adaptive:
        effort = None if reasoning is True else _effort(reasoning)
        return {"type": "adaptive"}, effort, []
    budget = _EFFORT_BUDGETS["medium"] if reasoning is True else (
        _EFFORT_BUDGETS[reasoning] if isinstance(reasoning, str) else reasoning)
    return {"type": "enabled", "budget_tokens": max(budget, _MIN_BUDGET_ANTHROPIC)}, None, []


def _thinks_anthropic(model: str, thinking: Any) -> bool:
    """Whether a request with this ``thinking`` field (``None``: none sent) thinks."""
    if isinstance(thinking, dict):
        return thinking.get("type") != "disabled"
    return bool(_ADAPTIVE_ONLY_ANTHROPIC.search(model)) or _claude_version(model) >= (5, 0)


def _usage_from_anthropic(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    # input_tokens counts only what came after the last cache breakpoint: the whole
    # prompt is input + cache reads + cache writes.
    read, write = usage.get("cache_read_input_tokens"), usage.get("cache_creation_input_tokens")
    prompt = (usage.get("input_tokens") or 0) + (read or 0) + (write or 0)
    return _usage(prompt, usage.get("output_tokens"), read, write)


def _finish_from_anthropic(reason: Any) -> str | None:
    return _STOP_REASONS_ANTHROPIC.get(reason, reason) if isinstance(reason, str) else None


def _request_anthropic(call: _Call, messages: list[ChatMessage], stream: bool
                       ) -> tuple[dict[str, Any], list[str]]:
    """The Messages body, and the options it leaves out."""
    options, fmt = call.options, call.fmt
    thinking, effort, left_out = None, None, list[str]()
    if options.reasoning is not None and "thinking" not in options.extra:
        thinking, effort, left_out = _thinking_to_anthropic(call.model, options.reasoning)
    thinks = _thinks_anthropic(call.model, options.extra.get("thinking", thinking))
    max_tokens = options.max_tokens
    if max_tokens is None:
        budget = (thinking or {}).get("budget_tokens", 0)
        max_tokens = max(_THINKING_MAX_TOKENS, budget + DEFAULT_MAX_TOKENS) if thinks else (
            DEFAULT_MAX_TOKENS)
    elif thinking and thinking.get("budget_tokens", 0) >= max_tokens:
        thinking["budget_tokens"] = max(max_tokens - 1, _MIN_BUDGET_ANTHROPIC)
    body: dict[str, Any] = {"model": call.model, "max_tokens": max_tokens,
                            "messages": _messages_to_anthropic(messages)}
    added = [_JSON_INSTRUCTION] if fmt.kind == "json" else (
        [_ANSWER_INSTRUCTION] if thinks and fmt.wire_schema is not None else [])
    system = _system_to_anthropic(messages, added)
    if thinking is not None:
        body["thinking"] = thinking
    if effort is not None:
        body["output_config"] = {"effort": effort}
    if system is not None:
        body["system"] = system
    if stream:
        body["stream"] = True
    wire_tools = tools_to_anthropic(options.tools or [])
    if fmt.wire_schema is not None:
        # A forced tool call: works on every Claude model that has tools, and the
        # answer arrives as an already-parsed object (the tool's input).
        wire_tools.append({"name": _ANSWER_TOOL,
                           "description": f"Give the answer ({fmt.name}) in this shape.",
                           "input_schema": fmt.wire_schema})
    if wire_tools:
        body["tools"] = wire_tools
    return body, left_out + _options_to_anthropic(options, body, fmt.wire_schema is not None,
                                                  thinks)


# thinking blocks carry "thinking" and "signature" (the text is empty when the model
# omits it, as Opus 4.7 and later do); redacted_thinking blocks carry encrypted "data".
_THINKING_BLOCKS = ("thinking", "redacted_thinking")


def _reasoning_from_anthropic(blocks: list[dict[str, Any]]
                              ) -> tuple[str | None, dict[str, Any] | None]:
    """The readable thinking, and the blocks to send back, in their order."""
    if not blocks:
        return None, None
    text = "".join(b.get("thinking") or "" for b in blocks if b.get("type") == "thinking")
    return text or None, {"provider": "anthropic", "blocks": blocks}


def _reply_from_anthropic(body: Any, fmt: _ResponseFormat
                          ) -> tuple[AssistantMessage, Usage | None]:
    if not isinstance(body, dict):
        raise APIError(f"unexpected Anthropic reply: {_short(body, 200)}", body=body)
    blocks = body.get("content") or []
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    uses = [b for b in blocks if b.get("type") == "tool_use"]
    reason = _finish_from_anthropic(body.get("stop_reason"))
    reasoning, state = _reasoning_from_anthropic(
        [b for b in blocks if b.get("type") in _THINKING_BLOCKS])
    answer = [b for b in uses if b.get("name") == _ANSWER_TOOL] if fmt.kind == "schema" else []
    if answer:
        text = json.dumps(answer[0].get("input") or {}, ensure_ascii=False)
        text = fmt.unwrap(text) if fmt.unwrap else text
        uses, reason = [], "stop"
    return (AssistantMessage(content=text,
                             tool_calls=convert_tool_calls_from_anthropic(uses) if uses else None,
                             finish_reason=reason or ("tool_calls" if uses else "stop"),
                             reasoning=reasoning, reasoning_state=state),
            _usage_from_anthropic(body.get("usage")))


_ANTHROPIC_EVENTS = frozenset({"message_start", "message_delta", "message_stop",
                               "content_block_start", "content_block_stop"})


class _AnthropicStream(_StreamState):
    """Messages events: ``message_start`` (input tokens), content blocks with text,
    thinking (``thinking_delta``, ``signature_delta``) and ``input_json_delta``
    fragments, ``message_delta`` (stop reason, cumulative output tokens),
    ``message_stop``; ``ping`` and unknown events are skipped."""

    def __init__(self, unwrap: Callable[[str], str] | None = None,
                 answer_tool: bool = False) -> None:
        super().__init__(unwrap)
        self._answer_tool = answer_tool
        self._answer_blocks: set[Any] = set()
        self._usage: dict[str, Any] = {}  # the latest of each count
        self._thinking: dict[Any, list[Any]] = {}  # index -> [block, text pieces]
        self._open_thinking: set[Any] = set()

    def feed(self, frames: list[bytes]) -> list[StreamChunk]:
        out: list[StreamChunk] = []
        for frame in frames:
            event = _json_frame(frame)
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "content_block_delta":  # the most frequent: first
                self._delta(out, event.get("index"), event.get("delta") or {})
                continue
            if kind == "ping":
                # A model that thinks without showing it (omitted thinking) sends only
                # pings until its signature: alive, not stuck.
                self.progress += bool(self._open_thinking)
                continue
            self.progress += kind in _ANTHROPIC_EVENTS  # blocks, usage, the end
            if kind == "content_block_stop":
                self._open_thinking.discard(event.get("index"))
            elif kind == "content_block_start":
                self._start(out, event.get("index"), event.get("content_block") or {})
            elif kind == "message_start":
                self._count((event.get("message") or {}).get("usage"))
            elif kind == "message_delta":
                self._message_delta(event)
            elif kind == "message_stop":
                self.complete = True
            elif kind == "error":
                raise _stream_error(event.get("error") or {})
        return out

    def _start(self, out: list[StreamChunk], index: Any, block: dict[str, Any]) -> None:
        if block.get("type") in _THINKING_BLOCKS:
            self._thinking[index] = [dict(block), []]
            self._open_thinking.add(index)
            if block.get("thinking"):
                self._thinking[index][1].append(block["thinking"])
                self._think(out, block["thinking"])
        elif block.get("type") == "text" and block.get("text"):
            self._text(out, block["text"])
        elif block.get("type") == "tool_use":
            if self._answer_tool and block.get("name") == _ANSWER_TOOL:
                self._answer_blocks.add(index)
            else:
                self._call(index, block.get("id"), block.get("name"), "")

    def _delta(self, out: list[StreamChunk], index: Any, delta: dict[str, Any]) -> None:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            self._text(out, delta["text"])
        elif kind == "thinking_delta" and index in self._thinking:
            self._thinking[index][1].append(delta.get("thinking") or "")
            self._think(out, delta.get("thinking") or "")
        elif kind == "signature_delta" and index in self._thinking:
            self.progress += bool(delta.get("signature"))
            block = self._thinking[index][0]
            block["signature"] = block.get("signature", "") + (delta.get("signature") or "")
        elif kind == "input_json_delta":
            if index in self._answer_blocks:
                self._text(out, delta.get("partial_json") or "")
            elif index in self.calls:
                self.progress += bool(delta.get("partial_json"))
                self.calls[index][2].append(delta.get("partial_json") or "")

    def _message_delta(self, event: dict[str, Any]) -> None:
        reason = (event.get("delta") or {}).get("stop_reason")
        if reason:
            self.reason = _finish_from_anthropic(reason)
            if self._answer_blocks and reason == "tool_use":
                self.reason = "stop"
        self._count(event.get("usage"))

    def finish(self) -> list[StreamChunk]:
        blocks = []
        for block, pieces in self._thinking.values():
            if block.get("type") == "thinking":
                block["thinking"] = "".join(pieces)
            blocks.append(block)
        self.state = _reasoning_from_anthropic(blocks)[1]
        return super().finish()

    def _count(self, usage: Any) -> None:
        # Counts are cumulative: the latest replaces, never adds. message_start has the
        # input and cache counts; message_delta the output, and on some servers the rest.
        if isinstance(usage, dict) and usage:
            self._usage.update((k, v) for k, v in usage.items() if v is not None)
            self.usage = _usage_from_anthropic(self._usage)


def _models_from_anthropic(body: Any) -> tuple[list[ModelName], str | None]:
    """One page of models and the ``after_id`` that asks for the next (``None``: last page).

    GET /v1/models answers ``{"data": [{"type": "model", "id", "display_name",
    "created_at"}], "has_more", "first_id", "last_id"}``, newest first; the next page is
    ``?after_id=<last_id>`` while ``has_more`` is true (docs.anthropic.com/en/api/models-list;
    anthropic-sdk-python ``pagination.py`` ``SyncPage.next_page_info``). Servers that
    answer in OpenAI's shape (llama.cpp) send no ``has_more``: one page.
    """
    cursor = body.get("last_id") if isinstance(body, dict) and body.get("has_more") else None
    return _model_names(body, "data", "id"), cursor if isinstance(cursor, str) else None


# === 11. Clients =============================================================


class LLMClient(Protocol):
    """What ``Model`` needs from a client: any object with these two methods works.

    ``_chat`` returns the reply and its usage (``None`` when unknown);
    ``_stream`` is an async generator of ``StreamChunk``s whose last chunk carries
    ``finish_reason``, ``tool_calls`` and ``usage``. Both take the model name, the
    messages and the call's ``ChatOptions`` (upstream 0.7's protocol). A client
    written for 0.5, ``_chat(model, messages, response_format, max_tokens, tools,
    temperature)``, works too: ``Model`` tells the two apart once, by signature,
    and passes the other options that are set as keyword arguments. The built-in
    clients take either form and offer blocking twins, ``_chat_sync`` and
    ``_stream_sync``.

    ``Model.embed`` needs one more method, ``_embed(model, texts, **extra)``,
    returning one vector per text (in order) and the usage; ``_embed_sync`` is
    its blocking twin.
    """

    async def _chat(self, model: str, messages: list[ChatMessage],
                    options: ChatOptions) -> tuple[AssistantMessage, Usage | None]:
        ...

    def _stream(self, model: str, messages: list[ChatMessage],
                options: ChatOptions) -> AsyncIterator[StreamChunk]:
        ...


_LEGACY_PARAMETERS = ("response_format", "max_tokens", "tools", "temperature")


def _client_call(client: Any, model: Any, messages: Any, options: Any, args: tuple[Any, ...],
                 keywords: dict[str, Any]) -> _Call:
    """The call a built-in client's ``_chat``/``_stream`` was given: a ``_Call`` from
    ``Model`` as it is, else upstream 0.7's ``(model, messages, options)`` or 0.5's
    ``(model, messages, response_format, max_tokens, tools, temperature, **extra)``
    merged over the client's own defaults."""
    if isinstance(options, _Call):
        return options
    owner = type(client).__name__
    per_call = keywords.pop("options", None)
    if not isinstance(options, ChatOptions):  # 0.5: the third argument is response_format
        if len(args) > len(_LEGACY_PARAMETERS) - 1:
            raise ValidationError(f"{owner}: too many positional arguments", value=args)
        named = {**dict(zip(_LEGACY_PARAMETERS, (options, *args), strict=False)),
                 **{k: keywords.pop(k) for k in _LEGACY_PARAMETERS if k in keywords}}
        keywords, options = {**named, "extra": keywords}, per_call
    else:
        keywords = {"extra": keywords}
    if options is not None and not isinstance(options, ChatOptions):
        _fail(owner, "options", "a ChatOptions or None", options)
    return _new_call(owner, model, messages, (client._layer(), options, keywords))


def _base_url(value: str | None, env: str, default: str, owner: str, param: str = "base_url",
              normalise: Callable[[str], str] = str) -> tuple[str, dict[str, str]]:
    """The server URL, parsed once, and the ``Authorization`` its credentials make:
    ``https://user:pw@host`` means Basic auth, as httpx (under the official SDKs) reads
    it. An error names where the URL came from, never the URL: it may carry a key."""
    import base64
    from urllib.parse import unquote, urlsplit
    source = f"{param}=" if value else env
    url = normalise((value or _env(env) or default).strip()).rstrip("/")
    if (problem := _url_problem(url)) is not None:
        raise ConfigurationError(f"{owner}: the server URL from {source} is not valid: "
                                 f"{problem}")
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, {}
    token = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
    netloc = parts.netloc.rpartition("@")[2]
    return (parts._replace(netloc=netloc).geturl().rstrip("/"),
            {"Authorization": _Secret("Basic " + base64.b64encode(token).decode())})


def _bearer(owner: str, token: str | None, url_auth: dict[str, str]) -> dict[str, str]:
    """The ``Authorization`` header: the bearer token, or the URL's credentials, not both."""
    if token and url_auth:
        raise ConfigurationError(f"{owner}: the server URL carries credentials and a key is "
                                 "set too; keep one of them")
    return {"Authorization": f"Bearer {token}"} if token else dict(url_auth)


def _join_url(base: str, path: str, query: str = "") -> str:
    """``path`` after the base URL's path, then the base's query string (an Azure-style
    ``?api-version=``) joined with ``query``: never a query before the path."""
    prefix, _, base_query = base.partition("?")
    joined = "&".join(q for q in (base_query, query) if q)
    return prefix.rstrip("/") + path + (f"?{joined}" if joined else "")


def _json_body(body: Any) -> bytes:
    """A request body as strict JSON in UTF-8, the one way a body is written: whatever
    slipped past the checks (NaN in a tool's schema, a lone surrogate in a model's
    reply sent back) is refused here, naming where, before anything is sent."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        path, why, part = _json_problem(body, "body") or ("body", f"cannot be JSON: {exc}", None)
        raise ValidationError(f"the request cannot be sent: {path} {why}; give finite numbers "
                              "and text UTF-8 can encode", field=path, value=part) from exc


class _HTTPClient:
    """The machinery the three clients share: headers, request building, sending.

    A subclass supplies its provider's facts, endpoint, body builder, reply parser
    and stream parser; the request is built once and used by ``_chat`` and
    ``_stream`` alike.
    """

    _facts: ClassVar[_ProviderFacts]
    _decoder: ClassVar[type[_SSEDecoder | _NDJSONDecoder]] = _SSEDecoder
    _endpoint: str

    def __init__(self, *, timeout: float | None, max_retries: int,
                 extra_kwargs: dict[str, Any] | None,
                 default_headers: dict[str, str] | None, ssl_context: ssl.SSLContext | None,
                 auth: dict[str, str], system_message_handling: str | None = None,
                 reply_timeout: float | None = None, split_think: bool = True) -> None:
        owner = type(self).__name__
        _check_number(owner, "timeout", timeout, minimum=0.001)  # None: wait forever
        _check_number(owner, "reply_timeout", reply_timeout, minimum=0.001)
        _check_int(owner, "max_retries", max_retries, optional=False)
        if extra_kwargs is not None:
            _check_extra(owner, "extra_kwargs", extra_kwargs)
        user_headers = _header_dict(owner, "default_headers", default_headers)
        if ssl_context is not None and type(ssl_context).__name__ != "SSLContext":
            _fail(owner, "ssl_context", "an ssl.SSLContext", ssl_context)
        if system_message_handling is not None:
            _check_choice(owner, "system_message_handling", system_message_handling,
                          _SYSTEM_HANDLINGS)
        self.timeout = None if timeout is None else float(timeout)
        self.reply_timeout = None if reply_timeout is None else float(reply_timeout)
        self.split_think = bool(split_think)
        self.max_retries = max_retries
        self.extra_kwargs: dict[str, Any] = dict(extra_kwargs or {})
        self.system_message_handling = system_message_handling
        self._ssl_context = ssl_context
        self._headers = _merge_headers(
            {"Content-Type": "application/json", "Accept": "application/json",
             "User-Agent": _USER_AGENT}, {k: _Secret(v) for k, v in auth.items()}, user_headers)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(url={_redact_url(self._endpoint)!r}, "
                f"timeout={self.timeout})")

    def _layer(self) -> dict[str, Any] | None:
        """The client's defaults, the lowest layer of every call made through it."""
        if not self.extra_kwargs and self.system_message_handling is None:
            return None
        return {"extra": self.extra_kwargs,
                "system_message_handling": self.system_message_handling}

    def _body(self, call: _Call, messages: list[ChatMessage], stream: bool,
              dry_run: bool, abort: _Abort | None = None) -> tuple[dict[str, Any], list[str]]:
        """The provider's request body, and the options it leaves out."""
        raise NotImplementedError

    def _parse(self, body: Any, fmt: _ResponseFormat) -> tuple[AssistantMessage, Usage | None]:
        raise NotImplementedError

    def _stream_state(self, fmt: _ResponseFormat) -> _StreamState:
        raise NotImplementedError

    def _merge_extra(self, body: dict[str, Any], extra: dict[str, Any]) -> None:
        """Provider extras join the body; they never replace what the call set, nor
        ``stream``, which the transport decides."""
        for key, value in extra.items():
            if key in body or key == "stream":
                logger.warning("extra %r ignored: the request already sets it", key)
            else:
                body[key] = value

    def _build_request(self, call: _Call, stream: bool, dry_run: bool = False,
                       abort: _Abort | None = None) -> _Request:
        """The HTTP request for one call: the same for chat and stream but ``stream``;
        ``abort`` stops what building it may fetch (Ollama's image URLs)."""
        messages = call.messages
        if call.options.system_message_handling == "merge":
            messages = _merge_system(messages)
        body, left_out = self._body(call, messages, stream, dry_run, abort)
        if left_out:
            logger.warning("%s does not take %s: left out of the request",
                           self._facts.name, ", ".join(left_out))
        self._merge_extra(body, call.options.extra)
        data = _json_body(body)
        reply = None
        if not stream:
            # A non-streamed reply comes whole, after the model has thought: minutes
            # of silence for a reasoning model. With the default timeout it may take
            # DEFAULT_REPLY_TIMEOUT (the official SDKs wait as long); a timeout the
            # caller chose holds for it too, unless reply_timeout says otherwise.
            reply = self.reply_timeout if self.reply_timeout is not None else (
                DEFAULT_REPLY_TIMEOUT if self.timeout == _DEFAULT_CLIENT_TIMEOUT else None)
        return _Request("POST", self._endpoint, self._headers, data, self.timeout,
                        self.max_retries, self._ssl_context, reply)

    def _chat_blocking(self, abort: _Abort | None,
                       call: _Call) -> tuple[AssistantMessage, Usage | None]:
        return self._send(self._build_request(call, stream=False, abort=abort),
                          lambda body: self._parse(body, call.fmt), abort)

    def _stream_blocking(self, abort: _Abort | None,
                         call: _Call) -> Generator[list[StreamChunk], None, None]:
        req = self._build_request(call, stream=True, abort=abort)
        return _stream_batches(req, self._decoder(), self._stream_state(call.fmt), abort)

    async def _chat(self, model: str, messages: list[ChatMessage], options: Any = None,
                    *args: Any, **keywords: Any) -> tuple[AssistantMessage, Usage | None]:
        """See :class:`LLMClient`; 0.5's arguments and provider extras are taken too."""
        call = _client_call(self, model, messages, options, args, keywords)
        return await _run_blocking(lambda abort: self._chat_blocking(abort, call))

    async def _stream(self, model: str, messages: list[ChatMessage], options: Any = None,
                      *args: Any, **keywords: Any) -> AsyncIterator[StreamChunk]:
        """See :class:`LLMClient`."""
        call = _client_call(self, model, messages, options, args, keywords)
        async for chunk in _aiter_blocking(lambda abort: self._stream_blocking(abort, call)):
            yield chunk

    def _chat_sync(self, model: str, messages: list[ChatMessage], options: Any = None,
                   *args: Any, **keywords: Any) -> tuple[AssistantMessage, Usage | None]:
        """Blocking ``_chat``: no event loop involved."""
        return self._chat_blocking(None, _client_call(self, model, messages, options, args,
                                                      keywords))

    def _stream_sync(self, model: str, messages: list[ChatMessage], options: Any = None,
                     *args: Any, **keywords: Any) -> Iterator[StreamChunk]:
        """Blocking ``_stream``; closing the generator closes the connection."""
        call = _client_call(self, model, messages, options, args, keywords)
        for batch in self._stream_blocking(None, call):
            yield from batch

    def _dry_run(self, model: str, messages: list[ChatMessage], options: Any = None,
                 *args: Any, stream: bool = False, **keywords: Any) -> dict[str, Any]:
        """The request a call would send, with credentials redacted (for ``--dry-run``)."""
        call = _client_call(self, model, messages, options, args, keywords)
        req = self._build_request(call, stream, dry_run=True)
        secrets = _secrets_in(req.headers, req.url)
        headers = {k: ("<redacted>" if v in secrets or k.lower() in _SENSITIVE_HEADERS else v)
                   for k, v in req.headers.items()}
        return {"method": req.method, "url": _scrub(req.url, secrets), "headers": headers,
                "body": json.loads(req.body or b"null")}

    # -- beyond chat: model lists and embeddings, on the same transport -----------

    _embed_endpoint: str
    _embed_batch: ClassVar[int | None] = None  # most inputs per request; None: no limit

    def _send_json(self, method: str, url: str, parse: Callable[[Any], _T],
                   body: Any = None, abort: _Abort | None = None) -> _T:
        """One JSON request with this client's headers, timeout and retries."""
        data = None if body is None else _json_body(body)
        req = _Request(method, url, self._headers, data, self.timeout, self.max_retries,
                       self._ssl_context)
        return self._send(req, parse, abort)

    @staticmethod
    def _send(req: _Request, parse: Callable[[Any], _T], abort: _Abort | None) -> _T:
        """``parse`` of the JSON reply to ``req``; no error it raises shows a secret."""
        try:
            return parse(_request_json(req, abort)[0])
        except APIError as exc:
            _scrub_error(exc, req.headers, req.url)
            raise

    def list_models(self) -> list[ModelName]:
        """The names of the models the server offers; each keeps the provider's
        details of its model in ``.details``."""
        raise NotImplementedError

    def _embedding_body(self, model: str, texts: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def _parse_embeddings(self, body: Any, count: int
                          ) -> tuple[list[list[float]], Usage | None]:
        raise NotImplementedError

    def _embed_blocking(self, abort: _Abort | None, model: str, texts: list[str],
                        extra: dict[str, Any]) -> tuple[list[list[float]], Usage | None]:
        """Every text's vector, in order, in as few requests as the API allows."""
        _check_str(type(self).__name__, "model", model)
        if not texts:
            return [], _usage(0, 0)
        vectors: list[list[float]] = []
        usage: Usage | None = None
        size = self._embed_batch or len(texts)
        for start in range(0, len(texts), size):
            batch = texts[start:start + size]
            body = self._embedding_body(model, batch)
            self._merge_extra(body, extra)
            got, spent = self._send_json(
                "POST", self._embed_endpoint,
                functools.partial(self._parse_embeddings, count=len(batch)), body, abort)
            vectors += got
            if spent is not None:
                usage = spent if usage is None else usage + spent
        return vectors, usage

    async def _embed(self, model: str, texts: list[str],
                     **extra: Any) -> tuple[list[list[float]], Usage | None]:
        """See :class:`LLMClient`; ``extra`` keys join the request body."""
        return await _run_blocking(lambda abort: self._embed_blocking(abort, model, texts,
                                                                      extra))

    def _embed_sync(self, model: str, texts: list[str],
                    **extra: Any) -> tuple[list[list[float]], Usage | None]:
        """Blocking ``_embed``."""
        return self._embed_blocking(None, model, texts, extra)


class OpenAIClient(_HTTPClient):
    """OpenAI Chat Completions, and every server that speaks it (vLLM, llama.cpp,
    LM Studio, OpenRouter, Ollama's ``/v1``).

    The key comes from ``api_key`` or ``OPENAI_API_KEY`` and the URL from
    ``base_url`` or ``OPENAI_BASE_URL``; a local server that needs no key gets no
    ``Authorization`` header. ``max_retries``, ``default_headers``,
    ``ssl_context`` (e.g. a corporate CA bundle), ``system_message_handling`` and
    ``reply_timeout`` (the longest wait for a non-streamed reply: a reasoning model
    thinks silently first; 600 s with the default ``timeout``) are extras every
    client takes; ``split_think=False`` (here and on Ollama) keeps a ``<think>``
    block a server left in the content as sent.
    """

    _facts = _PROVIDERS["openai"]

    def __init__(self, api_key: str | None = None, base_url: str | None = None,
                 organization: str | None = None, timeout: float | None = 60.0,
                 extra_kwargs: dict[str, Any] | None = None, *, project: str | None = None,
                 max_retries: int = 2, default_headers: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 system_message_handling: Literal["passthrough", "merge"] | None = None,
                 reply_timeout: float | None = None, split_think: bool = True) -> None:
        for name, value in (("api_key", api_key), ("base_url", base_url),
                            ("organization", organization), ("project", project)):
            _check_str("OpenAIClient", name, value, optional=True)
        facts = self._facts
        self.base_url, url_auth = _base_url(base_url, facts.url_env, OPENAI_BASE_URL,
                                            "OpenAIClient")
        key = _credential("OpenAIClient", "api_key", api_key, facts.key_env)
        official = self.base_url.startswith(OPENAI_BASE_URL)
        self._dialect = "openai" if official else (
            "openrouter" if "openrouter.ai" in self.base_url else "compatible")
        if key is None and official:
            raise ConfigurationError("OpenAIClient needs an API key for api.openai.com: pass "
                                     f"api_key=... or set {facts.key_env}")
        auth = _bearer("OpenAIClient", key, url_auth)
        organization = _credential("OpenAIClient", "organization", organization, "OPENAI_ORG_ID")
        project = _credential("OpenAIClient", "project", project, "OPENAI_PROJECT_ID")
        if organization:
            auth["OpenAI-Organization"] = organization
        if project:
            auth["OpenAI-Project"] = project
        self._endpoint = _join_url(self.base_url, "/chat/completions")
        self._embed_endpoint = _join_url(self.base_url, "/embeddings")
        super().__init__(timeout=timeout, max_retries=max_retries, extra_kwargs=extra_kwargs,
                         default_headers=default_headers, ssl_context=ssl_context, auth=auth,
                         system_message_handling=system_message_handling,
                         reply_timeout=reply_timeout, split_think=split_think)

    def _body(self, call: _Call, messages: list[ChatMessage], stream: bool,
              dry_run: bool, abort: _Abort | None = None) -> tuple[dict[str, Any], list[str]]:
        return _request_openai(call, messages, stream, self._dialect)

    def _parse(self, body: Any, fmt: _ResponseFormat) -> tuple[AssistantMessage, Usage | None]:
        return _reply_from_openai(body, fmt, self.split_think)

    def _stream_state(self, fmt: _ResponseFormat) -> _StreamState:
        return _OpenAIStream(fmt.unwrap, self.split_think)

    # The API refuses more than 2048 inputs in one request (openai-python
    # types/embedding_create_params.py: "any array must be 2048 dimensions or less").
    _embed_batch = 2048

    def list_models(self) -> list[ModelName]:
        """``GET {base_url}/models``: the models this key (or this server) offers."""
        return self._send_json("GET", _join_url(self.base_url, "/models"), _models_from_openai)

    def _embedding_body(self, model: str, texts: list[str]) -> dict[str, Any]:
        return _embedding_request_openai(model, texts)

    def _parse_embeddings(self, body: Any, count: int
                          ) -> tuple[list[list[float]], Usage | None]:
        return _embeddings_from_openai(body, count)


class AnthropicClient(_HTTPClient):
    """Anthropic Messages API.

    The key comes from ``api_key`` or ``ANTHROPIC_API_KEY`` (``x-api-key``), or a
    bearer ``auth_token`` / ``ANTHROPIC_AUTH_TOKEN``; the URL from ``base_url`` or
    ``ANTHROPIC_BASE_URL``. Every system message is sent, not only the first.
    """

    _facts = _PROVIDERS["anthropic"]

    def __init__(self, api_key: str | None = None, base_url: str | None = None,
                 timeout: float | None = 60.0, extra_kwargs: dict[str, Any] | None = None, *,
                 auth_token: str | None = None, max_retries: int = 2,
                 default_headers: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 system_message_handling: Literal["passthrough", "merge"] | None = None,
                 reply_timeout: float | None = None) -> None:
        for name, value in (("api_key", api_key), ("base_url", base_url),
                            ("auth_token", auth_token)):
            _check_str("AnthropicClient", name, value, optional=True)
        facts = self._facts
        self.base_url, url_auth = _base_url(base_url, facts.url_env, ANTHROPIC_BASE_URL,
                                            "AnthropicClient")
        key = _credential("AnthropicClient", "api_key", api_key, facts.key_env)
        token = _credential("AnthropicClient", "auth_token", auth_token, "ANTHROPIC_AUTH_TOKEN")
        if key is None and token is None and self.base_url == ANTHROPIC_BASE_URL:
            raise ConfigurationError("AnthropicClient needs an API key: pass api_key=... or "
                                     f"set {facts.key_env}")
        auth = _bearer("AnthropicClient", token, url_auth)
        if key:
            auth["x-api-key"] = key
        self._endpoint = _join_url(self.base_url, "/v1/messages")
        super().__init__(timeout=timeout, max_retries=max_retries, extra_kwargs=extra_kwargs,
                         default_headers={"anthropic-version": ANTHROPIC_VERSION,
                                          **(default_headers or {})},
                         ssl_context=ssl_context, auth=auth,
                         system_message_handling=system_message_handling,
                         reply_timeout=reply_timeout)

    def _body(self, call: _Call, messages: list[ChatMessage], stream: bool,
              dry_run: bool, abort: _Abort | None = None) -> tuple[dict[str, Any], list[str]]:
        return _request_anthropic(call, messages, stream)

    def _parse(self, body: Any, fmt: _ResponseFormat) -> tuple[AssistantMessage, Usage | None]:
        return _reply_from_anthropic(body, fmt)

    def _stream_state(self, fmt: _ResponseFormat) -> _StreamState:
        return _AnthropicStream(fmt.unwrap, answer_tool=fmt.kind == "schema")

    def list_models(self) -> list[ModelName]:
        """``GET /v1/models``, every page of it (newest models first)."""
        from urllib.parse import quote
        models: list[ModelName] = []
        after: str | None = None
        while True:
            query = "limit=1000" + (f"&after_id={quote(after, safe='')}" if after else "")
            page, cursor = self._send_json("GET", _join_url(self.base_url, "/v1/models", query),
                                           _models_from_anthropic)
            models += page
            if cursor is None or cursor == after:  # a server repeating its page ends it too
                return models
            after = cursor

    def _embed_blocking(self, abort: _Abort | None, model: str, texts: list[str],
                        extra: dict[str, Any]) -> tuple[list[list[float]], Usage | None]:
        raise UnsupportedProviderError(
            "AnthropicClient cannot make embeddings: Anthropic has no embeddings API (its "
            "documentation points to Voyage AI). Use OpenAIClient or OllamaClient with an "
            "embedding model.")


def _ollama_host(host: str | None) -> str:
    """``OLLAMA_HOST`` rules: a bare host gets ``http://`` and port 11434."""
    value = (host or _env(_PROVIDERS["ollama"].url_env) or OLLAMA_HOST).strip().rstrip("/")
    if "://" not in value:
        value = "http://" + value
        if not re.search(r":\d+$", value):
            value += ":11434"
    return value


class OllamaClient(_HTTPClient):
    """Ollama's native ``/api/chat`` (NDJSON streams).

    The host comes from ``host`` or ``OLLAMA_HOST``; ``OLLAMA_API_KEY`` (or
    ``api_key``) adds a bearer token for ollama.com. Image URLs are downloaded
    here and sent as base64: public addresses only unless
    ``allow_private_image_urls=True``.
    """

    _facts = _PROVIDERS["ollama"]
    _decoder = _NDJSONDecoder

    def __init__(self, host: str | None = None, timeout: float | None = 60.0, *,
                 api_key: str | None = None, extra_kwargs: dict[str, Any] | None = None,
                 max_retries: int = 2, default_headers: dict[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 allow_private_image_urls: bool = False,
                 system_message_handling: Literal["passthrough", "merge"] | None = None,
                 reply_timeout: float | None = None, split_think: bool = True) -> None:
        _check_str("OllamaClient", "host", host, optional=True)
        _check_str("OllamaClient", "api_key", api_key, optional=True)
        facts = self._facts
        self.host, url_auth = _base_url(host, facts.url_env, OLLAMA_HOST, "OllamaClient",
                                        "host", _ollama_host)
        if not isinstance(allow_private_image_urls, bool):  # "false" would be true
            raise ConfigurationError("OllamaClient: allow_private_image_urls must be True or "
                                     f"False, got {type(allow_private_image_urls).__name__}")
        self.allow_private_image_urls = allow_private_image_urls
        key = _credential("OllamaClient", "api_key", api_key, facts.key_env)
        self._endpoint = _join_url(self.host, "/api/chat")
        self._embed_endpoint = _join_url(self.host, "/api/embed")
        super().__init__(timeout=timeout, max_retries=max_retries, extra_kwargs=extra_kwargs,
                         default_headers=default_headers, ssl_context=ssl_context,
                         auth=_bearer("OllamaClient", key, url_auth),
                         system_message_handling=system_message_handling,
                         reply_timeout=reply_timeout, split_think=split_think)

    def _body(self, call: _Call, messages: list[ChatMessage], stream: bool,
              dry_run: bool, abort: _Abort | None = None) -> tuple[dict[str, Any], list[str]]:
        wire = _messages_to_ollama(messages, self.allow_private_image_urls, self._ssl_context,
                                   fetch=not dry_run, timeout=self.timeout, abort=abort)
        return _request_ollama(call, wire, stream)

    def _merge_extra(self, body: dict[str, Any], extra: dict[str, Any]) -> None:
        """Model parameters (``num_ctx``, ``min_p``...) and a raw ``options`` dict go into
        ``options``; the call's own values win."""
        def inside(key: str) -> bool:
            return key in _OLLAMA_OPTIONS or (key == "options" and isinstance(extra[key], dict))
        for key, value in extra.items():
            for name, item in (value.items() if key == "options" else [(key, value)]):
                if inside(key):
                    body["options"].setdefault(name, item)
        super()._merge_extra(body, {k: v for k, v in extra.items() if not inside(k)})

    def _parse(self, body: Any, fmt: _ResponseFormat) -> tuple[AssistantMessage, Usage | None]:
        return _reply_from_ollama(body, fmt, self.split_think)

    def _stream_state(self, fmt: _ResponseFormat) -> _StreamState:
        return _OllamaStream(split_think=self.split_think)

    def list_models(self) -> list[ModelName]:
        """``GET /api/tags``: the models pulled on this host, as ``ollama list`` shows."""
        return self._send_json("GET", _join_url(self.host, "/api/tags"), _models_from_ollama)

    # /api/embed documents no limit on the inputs of one request: all go at once.
    def _embedding_body(self, model: str, texts: list[str]) -> dict[str, Any]:
        return _embedding_request_ollama(model, texts)

    def _parse_embeddings(self, body: Any, count: int
                          ) -> tuple[list[list[float]], Usage | None]:
        return _embeddings_from_ollama(body, count)


_Reply = Union[str, AssistantMessage, "tuple[Any, ...]", "list[StreamChunk]",
               "list[list[float]]", BaseException, "type[BaseException]"]


def _is_vectors(value: Any) -> bool:
    """Scripted embeddings: a list of vectors, each a list of numbers."""
    return isinstance(value, list) and all(
        isinstance(v, list) and all(type(x) in (float, int) for x in v) for v in value)


class ScriptedClient:
    """An ``LLMClient`` that answers from a script, for testing code built on casual_llm.

    Each call takes the next queued reply: a string, an ``AssistantMessage``, a
    ``(reply, Usage)`` pair, a list of ``StreamChunk``s, or an exception (raised).
    Streams split text replies into word chunks and end with the usual final
    chunk. ``Model.embed`` takes a list of vectors (one per text), alone or as a
    ``(vectors, Usage)`` pair. Every call is recorded in ``calls``. With
    ``echo=True``, an empty queue answers chats with the last user message instead
    of failing.
    """

    def __init__(self, *replies: _Reply, echo: bool = False) -> None:
        import collections
        self.replies: collections.deque[_Reply] = collections.deque()
        self.calls: list[dict[str, Any]] = []
        self.echo = echo
        self.add(*replies)

    def add(self, *replies: _Reply) -> ScriptedClient:
        """Queue more replies; returns the client for chaining."""
        for reply in replies:
            ok = isinstance(reply, (str, AssistantMessage, BaseException)) or (
                isinstance(reply, type) and issubclass(reply, BaseException)) or (
                isinstance(reply, tuple) and len(reply) == 2 and isinstance(
                    reply[0], (str, AssistantMessage)) and isinstance(reply[1], (Usage, type(None)))
            ) or (isinstance(reply, list) and all(isinstance(c, StreamChunk) for c in reply)
                  ) or _is_vectors(reply) or (isinstance(reply, tuple) and len(reply) == 2 and
                                              _is_vectors(reply[0]) and
                                              isinstance(reply[1], (Usage, type(None))))
            if not ok:
                _fail("ScriptedClient", "replies", "str, AssistantMessage, (reply, Usage), "
                      "a list of StreamChunk, a list of vectors or an exception", reply)
            self.replies.append(reply)
        return self

    def _layer(self) -> None:
        return None

    def _next(self, stream: bool, call: _Call) -> tuple[AssistantMessage, Usage | None,
                                                         list[StreamChunk] | None]:
        options = call.options
        self.calls.append({"stream": stream, "model": call.model, "messages": list(call.messages),
                           "response_format": options.response_format,
                           "max_tokens": options.max_tokens, "tools": options.tools,
                           "temperature": options.temperature, "extra": options.extra,
                           "options": options})
        if self.replies:
            reply = self.replies.popleft()
        elif self.echo:
            users = [m for m in call.messages if isinstance(m, UserMessage)]
            text = users[-1].content if users else ""
            reply = text if isinstance(text, str) else " ".join(
                p.text for p in text or [] if isinstance(p, TextContent))
        else:
            raise CasualLLMError(f"ScriptedClient has no reply left for call #{len(self.calls)}; "
                                 "queue more with .add(...)")
        if isinstance(reply, (BaseException, type)):
            raise reply
        scripted = reply[0] if isinstance(reply, tuple) else reply
        if scripted and _is_vectors(scripted):
            raise CasualLLMError(f"ScriptedClient call #{len(self.calls)} is a chat, but its "
                                 "scripted reply is a list of vectors (for Model.embed)")
        if isinstance(reply, list):
            chunks = typing.cast("list[StreamChunk]", reply)  # vectors were refused above
            final = chunks[-1] if chunks else _chunk("")
            return (AssistantMessage(content="".join(c.content for c in chunks),
                                     tool_calls=final.tool_calls,
                                     finish_reason=final.finish_reason), final.usage, chunks)
        usage = None
        if isinstance(reply, tuple):
            reply, usage = reply
        message = AssistantMessage(content=reply) if isinstance(reply, str) else reply
        if message.finish_reason is None:
            message = message.model_copy(update={
                "finish_reason": "tool_calls" if message.tool_calls else "stop"})
        return message.model_copy(), usage, None

    def _chat_sync(self, model: str, messages: list[ChatMessage], options: Any = None,
                   *args: Any, **keywords: Any) -> tuple[AssistantMessage, Usage | None]:
        """Take the next reply."""
        call = _client_call(self, model, messages, options, args, keywords)
        message, usage, _ = self._next(False, call)
        return message, usage

    async def _chat(self, model: str, messages: list[ChatMessage], options: Any = None,
                    *args: Any, **keywords: Any) -> tuple[AssistantMessage, Usage | None]:
        """Take the next reply."""
        return self._chat_sync(model, messages, options, *args, **keywords)

    def _stream_sync(self, model: str, messages: list[ChatMessage], options: Any = None,
                     *args: Any, **keywords: Any) -> Iterator[StreamChunk]:
        """Take the next reply, in chunks."""
        call = _client_call(self, model, messages, options, args, keywords)
        message, usage, chunks = self._next(True, call)
        if chunks is not None:
            yield from chunks
            return
        for piece in re.findall(r"\s*\S+\s*", message.content or ""):
            yield _chunk(piece)
        yield _chunk("", message.finish_reason, message.tool_calls, usage, message=message)

    async def _stream(self, model: str, messages: list[ChatMessage], options: Any = None,
                      *args: Any, **keywords: Any) -> AsyncIterator[StreamChunk]:
        """Take the next reply, in chunks."""
        for chunk in self._stream_sync(model, messages, options, *args, **keywords):
            yield chunk

    def _embed_sync(self, model: str, texts: list[str],
                    **extra: Any) -> tuple[list[list[float]], Usage | None]:
        """Take the next reply: one vector per text."""
        self.calls.append({"embed": True, "model": model, "texts": list(texts), "extra": extra})
        if not self.replies:
            raise CasualLLMError(f"ScriptedClient has no reply left for call #{len(self.calls)} "
                                 "(embed); queue vectors with .add([[...], ...])")
        reply = self.replies.popleft()
        if isinstance(reply, (BaseException, type)):
            raise reply
        vectors, usage = reply if isinstance(reply, tuple) else (reply, None)
        if not _is_vectors(vectors) or len(vectors) != len(texts):
            raise CasualLLMError(f"ScriptedClient call #{len(self.calls)} embeds {len(texts)} "
                                 f"texts, but its scripted reply is {_short(reply)}")
        return [list(v) for v in vectors], usage

    async def _embed(self, model: str, texts: list[str],
                     **extra: Any) -> tuple[list[list[float]], Usage | None]:
        """Take the next reply: one vector per text."""
        return self._embed_sync(model, texts, **extra)


# === 12. Model ===============================================================

_REASK = ("Your previous reply did not match the required JSON schema:\n{errors}\n"
          "Reply again with only the corrected JSON.")
_Arguments = tuple[tuple[Any, ...], dict[str, Any]]


def _client_protocol(client: Any) -> str:
    """How ``Model`` calls ``client``, decided once: ``"call"`` (a built-in client takes
    the checked ``_Call``), ``"options"`` (upstream 0.7's ``_chat(model, messages,
    options)``) or ``"keywords"`` (0.5's ``_chat(model, messages, response_format, ...)``)."""
    if isinstance(client, (_HTTPClient, ScriptedClient)):
        return "call"
    try:
        parameters = inspect.signature(client._chat).parameters
    except (TypeError, ValueError):
        return "keywords"
    return "options" if "options" in parameters and "response_format" not in parameters else (
        "keywords")


def _client_arguments(protocol: str, call: _Call) -> _Arguments:
    """The arguments of ``_chat``/``_stream`` for a client of ``protocol``."""
    if protocol == "call":
        return (call.model, call.messages, call), {}
    if protocol == "options":
        return (call.model, call.messages, call.options), {}
    options = call.options
    # 0.5's clients take four options by name; any other that is set goes as an extra.
    extra = {name: getattr(options, name) for name in _OPTION_NAMES[len(_LEGACY_PARAMETERS):]
             if getattr(options, name) is not None}
    return (), {"model": call.model, "messages": call.messages,
                **{name: getattr(options, name) for name in _LEGACY_PARAMETERS},
                **extra, **options.extra}


def _check_texts(texts: Any) -> list[str]:
    """Texts to embed: a list of strings (a lone string would be a list of characters)."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        _fail("Model.embed", "texts", "a list of strings (for one text: [text])", texts)
    out = list(texts)
    if not all(isinstance(text, str) for text in out):
        _fail("Model.embed", "texts", "a list of strings", texts)
    return out


@dataclasses.dataclass(frozen=True)
class ToolEvent:
    """A tool call in a streamed run (``Model.run_stream``): sent once before it runs,
    with ``result`` ``None``, and once after, with its ``ToolResultMessage``."""

    call: AssistantToolCall
    result: ToolResultMessage | None = None


_Approve = Callable[[AssistantToolCall], Any]


def _tool_table(tools: Any) -> dict[str, Callable[..., Any]]:
    """The functions a run may call, by the name their schema gives them."""
    if not isinstance(tools, (list, tuple)) or not all(callable(f) for f in tools):
        _fail("Model.run", "tools", "a list of functions", tools)
    return {Tool.from_function(f).name: f for f in tools}


def _tool_output(value: Any) -> str:
    """A function's return value as tool result text: a str as it is, else JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


async def _approved(approve: _Approve | None, call: AssistantToolCall) -> bool:
    if approve is None:
        return True
    verdict = approve(call)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return bool(verdict)


async def _declined(call: AssistantToolCall) -> ToolResultMessage:
    return ToolResultMessage(name=call.function.name, tool_call_id=call.id, is_error=True,
                             content=f"The user declined to run {call.function.name}.")


async def _run_tool(function: Callable[..., Any] | None, call: AssistantToolCall,
                    names: Iterable[str], raise_errors: bool) -> ToolResultMessage:
    """One call's result; a failure is reported to the model, not raised (unless asked)."""
    import asyncio
    name = call.function.name

    def result(text: str, error: bool = False) -> ToolResultMessage:
        return ToolResultMessage(name=name, tool_call_id=call.id, content=text,
                                 is_error=True if error else None)
    if function is None:
        return result(f"unknown tool {name!r}; the tools are: {', '.join(names)}", True)
    try:
        arguments = call.function.parse_arguments()
        inspect.signature(function).bind(**arguments)
    except (TypeError, ValueError) as exc:
        return result(f"the arguments do not fit {name}: {exc}", True)
    try:
        if inspect.iscoroutinefunction(function):
            value = await function(**arguments)
        else:  # sync functions in the loop's worker threads (a bounded pool)
            value = await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(function, **arguments))
            if inspect.isawaitable(value):
                value = await value
    except Exception as exc:
        if raise_errors:
            raise
        return result(f"{type(exc).__name__}: {exc}", True)
    return result(_tool_output(value))


class Model:
    """A model on a client: ``chat``, ``stream`` and usage tracking.

    The model's defaults for every call are ``temperature`` and ``extra_kwargs``
    (casual-llm 0.5), ``default_options`` (a ``ChatOptions``, 0.7),
    ``system_message_handling`` (0.8) and ``reasoning`` (how hard a reasoning model
    thinks, see ``ChatOptions``); a call's own settings, as keywords or ``options=``,
    win over them. ``get_usage()`` is the last call's usage
    (streams and embeddings included) and ``total_usage`` the sum over every call.
    ``chat_sync``, ``stream_sync`` and ``embed_sync`` are the blocking faces for
    scripts and notebooks.
    """

    def __init__(self, client: LLMClient, name: str, temperature: float | None = None,
                 extra_kwargs: dict[str, Any] | None = None, *,
                 default_options: ChatOptions | None = None,
                 system_message_handling: Literal["passthrough", "merge"] | None = None,
                 reasoning: bool | Literal["low", "medium", "high"] | int | None = None) -> None:
        if isinstance(temperature, ChatOptions) and default_options is None:
            temperature, default_options = None, temperature  # 0.7: Model(client, name, options)
        if not (hasattr(client, "_chat") and hasattr(client, "_stream")):
            _fail("Model", "client", "an LLMClient (an object with _chat and _stream)", client)
        _check_str("Model", "name", name)
        _check_number("Model", "temperature", temperature, minimum=0)
        if extra_kwargs is not None:
            _check_extra("Model", "extra_kwargs", extra_kwargs)
        if default_options is not None and not isinstance(default_options, ChatOptions):
            _fail("Model", "default_options", "a ChatOptions or None", default_options)
        if system_message_handling is not None:
            _check_choice("Model", "system_message_handling", system_message_handling,
                          _SYSTEM_HANDLINGS)
        if reasoning is not None:
            _check_reasoning("Model", "reasoning", reasoning)
        self._client = client
        self.reasoning: bool | str | int | None = reasoning
        self.name = name
        self.temperature = temperature
        self.extra_kwargs: dict[str, Any] = dict(extra_kwargs or {})
        self.default_options = default_options
        self.system_message_handling = system_message_handling
        self._protocol = _client_protocol(client)
        self._last_usage: Usage | None = None
        self._total_usage = Usage(prompt_tokens=0, completion_tokens=0)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, temperature={self.temperature})"

    def get_usage(self) -> Usage | None:
        """Usage of the last ``chat`` or ``stream`` call (``None`` when unknown)."""
        return self._last_usage

    @property
    def total_usage(self) -> Usage:
        """Usage summed over every call this model made (re-asks included)."""
        return self._total_usage

    def _record(self, usage: Usage | None, earlier: Usage | None = None) -> None:
        """Keep a call's usage; ``earlier`` is what its previous attempts spent."""
        if usage is not None:
            with self._lock:
                self._total_usage = self._total_usage + usage
        self._last_usage = usage if earlier is None else earlier + (usage or _usage(0, 0))

    def _call(self, messages: Any, response_format: Any, max_tokens: Any, tools: Any,
              temperature: Any, options: Any, extra: dict[str, Any]) -> _Call:
        """The call, merged from the client's, the model's and this call's settings
        (lowest first) and checked once."""
        if isinstance(response_format, ChatOptions) and options is None:
            response_format, options = "text", response_format  # 0.7: chat(messages, options)
        if options is not None and not isinstance(options, ChatOptions):
            _fail("Model", "options", "a ChatOptions or None", options)
        model = None
        if (self.temperature is not None or self.extra_kwargs or self.system_message_handling
                or self.reasoning is not None):
            model = {"temperature": self.temperature, "extra": self.extra_kwargs,
                     "system_message_handling": self.system_message_handling,
                     "reasoning": self.reasoning}
        layer = getattr(self._client, "_layer", None)
        keywords = {"response_format": response_format, "max_tokens": max_tokens,
                    "tools": tools, "temperature": temperature, "extra": extra}
        return _new_call("Model", self.name, messages, (
            layer() if layer else None, model, self.default_options, options, keywords))

    def _chat_steps(self, call: _Call, validation_retries: int
                    ) -> typing.Generator[_Arguments, tuple[AssistantMessage, Usage | None],
                                          AssistantMessage]:
        """The chat logic without I/O: yields client arguments, receives their replies.

        The reply is parsed into the ``response_format`` type; an invalid reply is
        re-asked up to ``validation_retries`` times with the errors attached.
        """
        _check_int("Model", "validation_retries", validation_retries, optional=False)
        for attempt in range(validation_retries + 1):
            earlier = self._last_usage if attempt else None
            message, usage = yield _client_arguments(self._protocol, call)
            self._record(usage, earlier)
            if call.fmt.parse is None or message.tool_calls:
                return message
            try:
                message.parsed = call.fmt.parse(message.content or "")
                return message
            except SchemaValidationError as exc:
                if attempt == validation_retries:
                    raise
                errors = "\n".join(f"- {path}: {text}" for path, text in exc.errors) or str(exc)
                call = call._replace(messages=[
                    *call.messages, message, UserMessage(content=_REASK.format(errors=errors))])
        raise AssertionError("unreachable")  # pragma: no cover

    async def chat(self, messages: list[ChatMessage], response_format: Any = "text",
                   max_tokens: int | None = None, tools: list[Tool] | None = None,
                   temperature: float | None = None, *, options: ChatOptions | None = None,
                   validation_retries: int = 0, **extra: Any) -> AssistantMessage:
        """Send the conversation and return the reply.

        ``response_format`` is ``"text"``, ``"json"``, a JSON Schema dict or a type
        (dataclass, TypedDict, Enum, ``list[X]``..., a pydantic class): the reply's
        ``content`` is then the JSON text and ``parsed`` the validated value.
        ``options`` is a ``ChatOptions``; further keyword arguments are options
        (``top_p``, ``seed``, ``stop``...) or provider extras, sent as they are.
        """
        steps = self._chat_steps(self._call(messages, response_format, max_tokens, tools,
                                            temperature, options, extra), validation_retries)
        args, kwargs = next(steps)
        while True:
            try:
                args, kwargs = steps.send(await self._client._chat(*args, **kwargs))
            except StopIteration as done:
                result: AssistantMessage = done.value
                return result

    def chat_sync(self, messages: list[ChatMessage], response_format: Any = "text",
                  max_tokens: int | None = None, tools: list[Tool] | None = None,
                  temperature: float | None = None, *, options: ChatOptions | None = None,
                  validation_retries: int = 0, **extra: Any) -> AssistantMessage:
        """Blocking :meth:`chat`, for scripts and notebooks; same errors and usage."""
        blocking = getattr(self._client, "_chat_sync", None)
        steps = self._chat_steps(self._call(messages, response_format, max_tokens, tools,
                                            temperature, options, extra), validation_retries)
        args, kwargs = next(steps)
        while True:
            reply = (blocking(*args, **kwargs) if blocking
                     else _run_coroutine(self._client._chat(*args, **kwargs)))
            try:
                args, kwargs = steps.send(reply)
            except StopIteration as done:
                result: AssistantMessage = done.value
                return result

    async def stream(self, messages: list[ChatMessage], response_format: Any = "text",
                     max_tokens: int | None = None, tools: list[Tool] | None = None,
                     temperature: float | None = None, *, options: ChatOptions | None = None,
                     **extra: Any) -> AsyncIterator[StreamChunk]:
        """Stream the reply: text chunks as they arrive, then a final chunk with
        ``finish_reason``, ``tool_calls`` and ``usage`` (also kept for ``get_usage()``)."""
        call = self._call(messages, response_format, max_tokens, tools, temperature, options,
                          extra)
        args, kwargs = _client_arguments(self._protocol, call)
        usage: list[Usage | None] = [None]
        try:
            async for chunk in self._client._stream(*args, **kwargs):
                usage[0] = chunk.usage or usage[0]
                yield chunk
        finally:
            self._record(usage[0])

    def stream_sync(self, messages: list[ChatMessage], response_format: Any = "text",
                    max_tokens: int | None = None, tools: list[Tool] | None = None,
                    temperature: float | None = None, *, options: ChatOptions | None = None,
                    **extra: Any) -> Iterator[StreamChunk]:
        """Blocking :meth:`stream`: ``for chunk in model.stream_sync(...)``."""
        call = self._call(messages, response_format, max_tokens, tools, temperature, options,
                          extra)
        args, kwargs = _client_arguments(self._protocol, call)
        blocking = getattr(self._client, "_stream_sync", None)
        chunks = (blocking(*args, **kwargs) if blocking
                  else _iter_blocking(self._client._stream(*args, **kwargs)))
        usage = None
        try:
            for chunk in chunks:
                usage = chunk.usage or usage
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            self._record(usage)

    def _embedder(self) -> Callable[..., Any]:
        embed = getattr(self._client, "_embed", None)
        if embed is None:
            raise UnsupportedProviderError(f"{type(self._client).__name__} cannot make "
                                           "embeddings: it has no _embed method")
        return typing.cast("Callable[..., Any]", embed)

    async def embed(self, texts: Sequence[str], **extra: Any) -> list[list[float]]:
        """One vector per text, in order; the usage is kept as a chat's is.

        Keyword arguments are provider options (``dimensions``; Ollama's
        ``truncate``, ``num_ctx``...). The model's ``extra_kwargs`` are chat
        options: they are not sent.
        """
        texts = _check_texts(texts)
        vectors, usage = await self._embedder()(self.name, texts, **extra)
        self._record(usage)
        return typing.cast("list[list[float]]", vectors)

    def embed_sync(self, texts: Sequence[str], **extra: Any) -> list[list[float]]:
        """Blocking :meth:`embed`."""
        texts = _check_texts(texts)
        blocking = getattr(self._client, "_embed_sync", None)
        vectors, usage = (blocking(self.name, texts, **extra) if blocking
                          else _run_coroutine(self._embedder()(self.name, texts, **extra)))
        self._record(usage)
        return typing.cast("list[list[float]]", vectors)

    # -- tools that run ----------------------------------------------------------

    async def _run_events(self, messages: list[ChatMessage], tools: Any, max_turns: int,
                          approve: _Approve | None, raise_errors: bool, stream: bool,
                          keywords: dict[str, Any]
                          ) -> AsyncIterator[StreamChunk | ToolEvent | AssistantMessage]:
        """The run, as events: stream chunks (``stream``), tool events, and last the
        final reply; ``messages`` grows with every turn."""
        import asyncio
        if not isinstance(messages, list):
            _fail("Model.run", "messages", "a list (it is extended in place)", messages)
        _check_int("Model.run", "max_turns", max_turns, optional=False, minimum=1)
        functions = _tool_table(tools)
        schemas = [Tool.from_function(f) for f in functions.values()]
        spent: Usage | None = None
        for _ in range(max_turns):
            if stream:
                reply = None
                async for chunk in self.stream(messages, tools=schemas, **keywords):
                    yield chunk
                    reply = chunk.message or reply
                reply = reply or AssistantMessage(content="")
            else:
                reply = await self.chat(messages, tools=schemas, **keywords)
            used = self._last_usage
            spent = used if spent is None else spent + (used or _usage(0, 0))
            messages.append(reply)
            if not reply.tool_calls:
                self._last_usage = spent
                yield reply
                return
            calls = reply.tool_calls
            for call in calls:
                yield ToolEvent(call)
            approved = [await _approved(approve, call) for call in calls]  # one at a time
            results = await asyncio.gather(*(
                _run_tool(functions.get(call.function.name), call, functions, raise_errors)
                if ok else _declined(call) for call, ok in zip(calls, approved, strict=True)))
            for call, result in zip(calls, results, strict=True):
                messages.append(result)
                yield ToolEvent(call, result)
        self._last_usage = spent
        raise MaxTurnsExceededError(
            f"the model still asks for tools after {max_turns} turns (max_turns); the "
            "conversation so far is in .messages", messages=messages, turns=max_turns)

    async def run(self, messages: list[ChatMessage], tools: list[Callable[..., Any]], *,
                  max_turns: int = 10, approve: _Approve | None = None,
                  raise_errors: bool = False, **keywords: Any) -> AssistantMessage:
        """Chat, run the functions the model calls, send their results, until it answers.

        ``tools`` are plain functions, sync or async (their schemas come from
        ``Tool.from_function``); calls asked for together run together, and results
        are appended in the order of the calls. A function's exception, an unknown
        name or arguments that do not fit become the tool's result (``is_error``)
        unless ``raise_errors``. ``approve(call)`` (sync or async) is asked before
        each call; a refusal is reported to the model. ``messages`` is extended in
        place; the first reply without tool calls is returned. More than
        ``max_turns`` model calls raise ``MaxTurnsExceededError``. Other keywords
        (``temperature``, ``reasoning``, ``options``...) apply to every turn;
        ``get_usage()`` is then the whole run's.
        """
        final: AssistantMessage | None = None
        async for event in self._run_events(messages, tools, max_turns, approve, raise_errors,
                                            False, keywords):
            if isinstance(event, AssistantMessage):
                final = event
        assert final is not None
        return final

    def run_sync(self, messages: list[ChatMessage], tools: list[Callable[..., Any]], *,
                 max_turns: int = 10, approve: _Approve | None = None,
                 raise_errors: bool = False, **keywords: Any) -> AssistantMessage:
        """Blocking :meth:`run`."""
        result: AssistantMessage = _run_coroutine(self.run(
            messages, tools, max_turns=max_turns, approve=approve, raise_errors=raise_errors,
            **keywords))
        return result

    async def run_stream(self, messages: list[ChatMessage], tools: list[Callable[..., Any]],
                         *, max_turns: int = 10, approve: _Approve | None = None,
                         raise_errors: bool = False, **keywords: Any
                         ) -> AsyncIterator[StreamChunk | ToolEvent]:
        """:meth:`run`, streamed: each turn's ``StreamChunk``s as :meth:`stream` yields
        them (text, reasoning, the final chunk with its ``message``), and a
        ``ToolEvent`` before and after every call."""
        async for event in self._run_events(messages, tools, max_turns, approve, raise_errors,
                                            True, keywords):
            if not isinstance(event, AssistantMessage):
                yield event

    def run_stream_sync(self, messages: list[ChatMessage], tools: list[Callable[..., Any]],
                        *, max_turns: int = 10, approve: _Approve | None = None,
                        raise_errors: bool = False, **keywords: Any
                        ) -> Iterator[StreamChunk | ToolEvent]:
        """Blocking :meth:`run_stream`: ``for event in model.run_stream_sync(...)``."""
        return _iter_blocking(self.run_stream(
            messages, tools, max_turns=max_turns, approve=approve, raise_errors=raise_errors,
            **keywords))


# === 13. Config and factories ================================================


class Provider(enum.Enum):
    """The providers casual_llm speaks to; ``Provider("OpenAI")`` works in any case."""

    OPENAI = "openai"
    OLLAMA = "ollama"
    ANTHROPIC = "anthropic"

    @classmethod
    def _missing_(cls, value: object) -> Provider | None:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.strip().lower():
                    return member
        return None


def _provider(value: Any) -> Provider:
    try:
        return value if isinstance(value, Provider) else Provider(value)
    except ValueError:
        valid = ", ".join(p.value for p in Provider)
        raise UnsupportedProviderError(f"Unknown provider: {value!r}. Valid providers: "
                                       f"{valid}") from None


@dataclasses.dataclass(repr=False)
class ClientConfig:
    """How to build a client: provider, URL, key, timeout, extras.

    ``provider`` may be a ``Provider`` or its name in any case; ``ca_bundle`` is a
    file of CA certificates to trust (a corporate proxy's). Without ``api_key``,
    ``name="open-router"`` reads ``OPEN_ROUTER_API_KEY``, else the provider's own
    variable (``OPENAI_API_KEY``...). The repr never shows the key.
    """

    provider: Provider | str
    base_url: str | None = None
    api_key: str | None = None
    timeout: float | None = 60.0
    extra_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str | None = None
    max_retries: int = 2
    ca_bundle: str | None = None
    system_message_handling: Literal["passthrough", "merge"] | None = None

    def __post_init__(self) -> None:
        self.provider = _provider(self.provider)
        for field in ("base_url", "api_key", "name", "ca_bundle"):
            _check_str("ClientConfig", field, getattr(self, field), optional=True)
        _check_number("ClientConfig", "timeout", self.timeout, minimum=0.001)
        _check_int("ClientConfig", "max_retries", self.max_retries, optional=False)
        _check_extra("ClientConfig", "extra_kwargs", self.extra_kwargs)
        if self.system_message_handling is not None:
            _check_choice("ClientConfig", "system_message_handling",
                          self.system_message_handling, _SYSTEM_HANDLINGS)

    def __repr__(self) -> str:
        url = self.base_url and _scrub(self.base_url, _secrets_in({}, self.base_url))
        return (f"ClientConfig(provider={self.provider}, base_url={url!r}, "
                f"api_key={_mask(self.api_key)}, timeout={self.timeout}, "
                f"extra_kwargs={self.extra_kwargs!r}, name={self.name!r}, "
                f"max_retries={self.max_retries}, ca_bundle={self.ca_bundle!r}, "
                f"system_message_handling={self.system_message_handling!r})")

    def resolved_api_key(self) -> str | None:
        """``api_key``, else ``<NAME>_API_KEY`` when ``name`` is set, else ``None``."""
        if self.api_key:
            return self.api_key
        if self.name:
            return _env(re.sub(r"[-.]", "_", self.name).upper() + "_API_KEY")
        return None


@dataclasses.dataclass
class ModelConfig:
    """How to build a ``Model``: its name and defaults, as 0.5 (``temperature``,
    ``extra_kwargs``) or 0.7/0.8 (``default_options``, ``system_message_handling``)
    give them; ``ModelConfig(name, ChatOptions(...))`` works too."""

    name: str
    temperature: float | None = None
    extra_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    default_options: ChatOptions | None = None
    system_message_handling: Literal["passthrough", "merge"] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, ChatOptions) and self.default_options is None:
            self.temperature, self.default_options = None, self.temperature  # 0.7's order
        _check_str("ModelConfig", "name", self.name)
        _check_number("ModelConfig", "temperature", self.temperature, minimum=0)
        _check_extra("ModelConfig", "extra_kwargs", self.extra_kwargs)
        if self.default_options is not None and not isinstance(self.default_options,
                                                               ChatOptions):
            _fail("ModelConfig", "default_options", "a ChatOptions or None",
                  self.default_options)
        if self.system_message_handling is not None:
            _check_choice("ModelConfig", "system_message_handling",
                          self.system_message_handling, _SYSTEM_HANDLINGS)


def _client_options(config: ClientConfig) -> dict[str, Any]:
    """The constructor arguments every client takes, from a config."""
    context = None
    if config.ca_bundle:
        try:
            context = _ssl_context(config.ca_bundle)
        except OSError as exc:  # ssl.SSLError is an OSError too
            raise ConfigurationError(f"ca_bundle {config.ca_bundle!r}: {exc}") from exc
    return {"api_key": config.resolved_api_key(), "timeout": config.timeout,
            "extra_kwargs": config.extra_kwargs or None, "max_retries": config.max_retries,
            "ssl_context": context, "system_message_handling": config.system_message_handling}


def _build_ollama(config: ClientConfig) -> OllamaClient:
    return OllamaClient(host=config.base_url, **_client_options(config))


def _url_builder(cls: type[OpenAIClient] | type[AnthropicClient]
             ) -> Callable[[ClientConfig], _HTTPClient]:
    return lambda config: cls(base_url=config.base_url, **_client_options(config))


# The provider registry: its facts are in _PROVIDERS (section 2), its wire format in
# sections 8-10, its client in section 11; this table and everything derived from it
# (create_client, the command line's help, choices and errors) make it a provider.
_CLIENT_BUILDERS: dict[Provider, Callable[[ClientConfig], _HTTPClient]] = {
    Provider.OPENAI: _url_builder(OpenAIClient),
    Provider.ANTHROPIC: _url_builder(AnthropicClient),
    Provider.OLLAMA: _build_ollama,
}


def create_client(config: ClientConfig) -> LLMClient:
    """A client for ``config.provider``."""
    if not isinstance(config, ClientConfig):
        _fail("create_client", "config", "a ClientConfig", config)
    builder = _CLIENT_BUILDERS.get(config.provider)  # type: ignore[arg-type]
    if builder is None:
        raise UnsupportedProviderError(f"Unsupported provider: {config.provider}")
    return builder(config)


def create_model(client: LLMClient, config: ModelConfig) -> Model:
    """A ``Model`` on ``client`` with ``config``'s name and defaults."""
    if not isinstance(config, ModelConfig):
        _fail("create_model", "config", "a ModelConfig", config)
    return Model(client=client, name=config.name, temperature=config.temperature,
                 extra_kwargs=config.extra_kwargs or None,
                 default_options=config.default_options,
                 system_message_handling=config.system_message_handling)


# === 14. Command line ========================================================
# ``python -m casual_llm``: a prompt in, one answer out; at a terminal, a chat.
# stdout carries the replies and nothing else (prompts, notes, usage and errors
# go to stderr), so output pipes cleanly. argparse, readline and socket load
# inside the functions that need them: ``--help`` and ``--version`` stay fast.

if typing.TYPE_CHECKING:  # pragma: no cover
    import argparse

def _facts(provider: Provider) -> _ProviderFacts:
    return _PROVIDERS[provider.value]


_ENVIRONMENT: dict[str, str] = {
    "CASUAL_LLM_MODEL": "the model when -m is not given: PROVIDER:MODEL or a bare name",
    "CASUAL_LLM_PROVIDER": "the provider of bare model names (default: CASUAL_LLM_MODEL's)",
    "CASUAL_LLM_BASE_URL": "the server of that provider (openai when none is named)",
    **{f"{_facts(p).key_env}, {_facts(p).url_env}": _facts(p).about for p in _CLIENT_BUILDERS},
    "HTTPS_PROXY, HTTP_PROXY, NO_PROXY": "proxies",
    "NO_COLOR": "no colour in the chat",
    "CASUAL_LLM_HISTORY": "the chat's line history file (default ~/.casual_llm_history)",
}
_EXIT_STATUSES: dict[int, str] = {
    0: "success",
    1: "provider or network error, or a reply that breaks --schema",
    2: "usage or configuration error",
    130: "interrupted (Ctrl-C)",
    141: "stdout was closed early (broken pipe)",
}
# First match wins: configuration errors are also CasualLLMErrors.
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigurationError, 2), (ValidationError, 2), (CasualLLMError, 1), (OSError, 1))
MAX_INPUT_SIZE = 16 * 1024 * 1024  # a text file, piped stdin, --schema or /load on the command line
_EXAMPLES = """\
examples:
  # one answer, streamed (a local Ollama unless CASUAL_LLM_MODEL says otherwise)
  %(prog)s "Why is the sky blue?"
  # a chat: no prompt, at a terminal (/help lists its commands)
  %(prog)s -m openai:gpt-4o-mini
  # piped stdin is the prompt, before any words
  git diff | %(prog)s -s "You review code." "Any bugs?"
  # an image, to Anthropic
  %(prog)s -m anthropic:claude-haiku-4-5 -a cat.jpg "What is this?"
  # any OpenAI-compatible server (llama.cpp, vLLM, LM Studio...)
  %(prog)s --base-url http://localhost:8080/v1 "Hi"
  # JSON checked against a schema; exit 1 when it does not match
  %(prog)s --schema '{"type": "object", "required": ["name"]}' "Name a cat, as JSON"
  # the request, printed and not sent
  %(prog)s --dry-run -o seed=1 "Hi"
  # what the local Ollama has pulled (any provider: -m PROVIDER or --base-url)
  %(prog)s --list-models -m ollama
"""
_NO_OLLAMA = """\
no Ollama at {url} ({reason}); it is the provider when none is configured.
Start Ollama (https://ollama.com, then: ollama pull {model}), or choose a provider:
{choices}
Set CASUAL_LLM_MODEL (e.g. openai:{openai}) to make a choice the default."""
_PROMPT, _MORE = ">>> ", "... "
_FENCE = '"""'  # multi-line chat input starts and ends with it, as in ``ollama run``


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m casual_llm`` command line; returns the exit code.

    ``argv`` defaults to ``sys.argv[1:]``; ``--help`` lists the options and the
    exit codes: 0 success, 1 provider or network error, 2 usage or configuration
    error, 130 interrupted.
    """
    prog = _prog()
    try:
        opts = _parser(prog).parse_intermixed_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse printed them
        return exc.code if isinstance(exc.code, int) else 2
    level = logger.level
    handler = _debug_logging(sys.stderr) if opts.debug else None
    session = None
    try:
        session = _Session(opts, prog)
        return session.run()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence(sys.stdout)
        return 141
    except Exception as exc:
        return _report(exc, opts, prog, session)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _prog() -> str:
    """The name in messages: the installed ``casual-llm`` script, else ``python -m casual_llm``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("casual") and not name.endswith(".py") else (
        "python -m casual_llm")


def _parser(prog: str) -> argparse.ArgumentParser:
    import argparse
    env = "\n".join(f"  {name:<38} {text}" for name, text in _ENVIRONMENT.items())
    codes = "\n".join(f"  {code:<4} {text}" for code, text in _EXIT_STATUSES.items())
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask OpenAI, Anthropic or Ollama: one answer for a prompt, or a chat "
                    "when run at a terminal without one. API keys come from the environment.",
        epilog=f"{_EXAMPLES}\n\nenvironment:\n{env}\n\nexit status:\n{codes}")
    parser.add_argument("prompt", nargs="*", help="the prompt (after piped stdin, if any)")
    group = parser.add_argument_group("model")
    group.add_argument("-m", "--model", metavar="[PROVIDER:]MODEL",
                       help=", ".join(f"{p.value}:{_facts(p).default_model}"
                                      for p in _CLIENT_BUILDERS)
                       + ", or a bare name for the default provider (CASUAL_LLM_MODEL; else a "
                         "local Ollama)")
    group.add_argument("--base-url", metavar="URL",
                       help="the server: an OpenAI-compatible one (the provider then defaults "
                            "to openai) or an Ollama host")
    group.add_argument("--api-key-env", metavar="NAME",
                       help="read the API key from this environment variable (keys are never "
                            "flags)")
    group.add_argument("--list-models", action="store_true",
                       help="print the models the server offers, one name per line, and exit")
    group = parser.add_argument_group("prompt")
    group.add_argument("-s", "--system", metavar="TEXT", help="a system prompt")
    group.add_argument("-a", "--attach", action="append", default=[], metavar="PATH|URL|-",
                       help="attach an image (repeatable; - reads it from stdin)")
    group.add_argument("-f", "--file", dest="files", action="append", default=[],
                       metavar="FILE", help="inline a text file into the prompt (repeatable)")
    group.add_argument("--reasoning", type=_reasoning_level, metavar="LEVEL",
                       help="how hard a reasoning model thinks: low, medium, high, a token "
                            "budget, on or off (the model's default otherwise)")
    group.add_argument("-t", "--temperature", type=_at_least(float, 0), metavar="T",
                       help="sampling temperature (the provider's default otherwise)")
    group.add_argument("--max-tokens", type=_at_least(int, 1), metavar="N",
                       help="the longest reply, in tokens")
    group.add_argument("-o", "--option", dest="options", action="append", default=[],
                       type=_option, metavar="KEY=VALUE",
                       help="a provider extra such as seed=1 or top_p=0.9 (VALUE is JSON "
                            "when it parses as JSON; repeatable)")
    formats = group.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="ask for JSON and check it")
    formats.add_argument("--schema", metavar="FILE|JSON",
                         help="ask for JSON matching this JSON Schema; exit 1 when it does not")
    _output_options(parser.add_argument_group("output"))
    _tool_options(parser.add_argument_group("tools"))
    _network_options(parser.add_argument_group("network"))
    parser.add_argument("--debug", action="store_true",
                        help="log requests and show tracebacks (keys stay redacted)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _output_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--no-stream", dest="stream", action="store_false",
                       help="print the reply when it is complete")
    group.add_argument("-u", "--usage", action="store_true",
                       help="print token usage (this reply and the session) to stderr")
    group.add_argument("-R", "--hide-reasoning", dest="show_reasoning", action="store_false",
                       help="do not show the model's thinking (shown dimmed on stderr)")
    group.add_argument("--output-json", action="store_true",
                       help="print one JSON record: model, content, reasoning, "
                            "finish_reason, usage")
    group.add_argument("-i", "--interactive", action="store_true",
                       help="continue as a chat after the first answer; turns come from stdin")


def _tool_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--functions", action="append", default=[], metavar="FILE.py",
                       help="make every public function in FILE.py a tool the model may "
                            "call (repeatable); each call is shown and, at a terminal, asked")
    group.add_argument("-y", "--yes", action="store_true",
                       help="run every tool call without asking")
    group.add_argument("--max-turns", type=_at_least(int, 1), default=10, metavar="N",
                       help="the most model calls one answer may take with tools (default: 10)")


def _network_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--timeout", type=_at_least(float, 0.001), default=60.0,
                       metavar="SECONDS", help="per connect and per read (default: 60)")
    group.add_argument("--retries", type=_at_least(int, 0), default=2, metavar="N",
                       help="retries of failed connections and 429/5xx replies (default: 2)")
    group.add_argument("--ca-bundle", metavar="FILE", help="trust these CA certificates")
    group.add_argument("--dry-run", action="store_true",
                       help="print the request (URL, headers with keys redacted, JSON body) "
                            "and send nothing")


def _at_least(kind: type[int | float], minimum: float) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` no smaller than ``minimum``."""
    def parse(text: str) -> float:
        import argparse
        value = kind(text)  # ValueError: argparse says "invalid float value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _reasoning_level(text: str) -> bool | str | int:
    """``--reasoning``: an effort, a token budget, ``on`` or ``off``."""
    value = text.strip().lower()
    if value in _EFFORTS:
        return value
    if value in ("on", "off"):
        return value == "on"
    if value.isdigit() and int(value) > 0:
        return int(value)
    import argparse
    raise argparse.ArgumentTypeError(f"expected low, medium, high, a token budget, on or off, "
                                     f"got {text!r}")


def _option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as JSON when it is JSON (``seed=1``), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        import argparse
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


@dataclasses.dataclass(frozen=True)
class _Target:
    """A provider, a model and where to reach it."""

    provider: Provider
    model: str
    base_url: str | None = None
    key_env: str | None = None

    def __str__(self) -> str:
        return f"{self.provider.value}:{self.model}"

    @property
    def default_ollama(self) -> bool:
        """The local Ollama that answers when nothing names a server."""
        return (self.provider is Provider.OLLAMA and self.base_url is None
                and _env("OLLAMA_HOST") is None)


def _split_model(spec: str) -> tuple[Provider | None, str]:
    """``PROVIDER:MODEL`` -> (provider, model); a bare provider name -> (provider, "").

    Anything else is a bare model name, so Ollama tags (``llama3.2:3b``) keep their colon.
    """
    head, sep, tail = spec.partition(":")
    try:
        provider = Provider(head)
    except ValueError:
        return None, spec
    return provider, tail.strip() if sep else ""


def _initial_target(opts: argparse.Namespace) -> _Target:
    """The provider: -m's prefix, else CASUAL_LLM_PROVIDER, else CASUAL_LLM_MODEL's prefix,
    else openai for a --base-url, else Ollama. CASUAL_LLM_BASE_URL goes with the provider
    the environment configures; --base-url with whichever is chosen."""
    env_provider, env_model = _split_model(_env("CASUAL_LLM_MODEL") or "")
    named = _env("CASUAL_LLM_PROVIDER")
    configured = _provider(named) if named else env_provider
    env_url = _env("CASUAL_LLM_BASE_URL")
    default = configured or (Provider.OPENAI if env_url or opts.base_url else Provider.OLLAMA)
    provider, model = _split_model(opts.model) if opts.model else (env_provider, env_model)
    provider = provider or default
    base_url = opts.base_url or (env_url if provider is default else None)
    return _Target(provider, model or _facts(provider).default_model, base_url, opts.api_key_env)


def _connect(target: _Target, opts: argparse.Namespace) -> tuple[_HTTPClient, Model]:
    """The client and model for ``target``, through the same registry as ``create_client``."""
    key = None
    if target.key_env:
        key = _env(target.key_env)
        if key is None:
            raise ConfigurationError(f"--api-key-env {target.key_env}: that environment "
                                     "variable is not set")
    if opts.ca_bundle and not os.path.isfile(opts.ca_bundle):
        raise ConfigurationError(f"--ca-bundle {opts.ca_bundle!r}: no such file")
    if target.base_url is not None:
        _check_url(_ollama_host(target.base_url) if target.provider is Provider.OLLAMA
                   else target.base_url)
    config = ClientConfig(provider=target.provider, base_url=target.base_url, api_key=key,
                          timeout=opts.timeout, max_retries=opts.retries,
                          ca_bundle=opts.ca_bundle)
    client = _CLIENT_BUILDERS[target.provider](config)
    model = Model(client, target.model, temperature=opts.temperature,
                  extra_kwargs=dict(opts.options), reasoning=opts.reasoning)
    return client, model


def _check_url(url: str) -> None:
    """A server URL that can be reached at all: a usage error (exit 2) now, not a network
    error at the first request. The message leaves the URL out: it may carry a key."""
    if (problem := _url_problem(url)) is not None:
        raise ConfigurationError("the server URL (--base-url or CASUAL_LLM_BASE_URL) is not "
                                 f"valid: {problem}")


def _check_ollama(timeout: float, model: str) -> None:
    """Fail fast, with how to configure a provider, when the default Ollama is not there."""
    import socket
    from urllib.parse import urlsplit
    url = _ollama_host(None)
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "localhost", parts.port or 80),
                                 timeout=min(timeout, 3.0)).close()
    except OSError as exc:
        choices = [(f"-m {p.value}:{_facts(p).default_model}", f"with {_facts(p).key_env} set")
                   for p in _CLIENT_BUILDERS if p is not Provider.OLLAMA]
        choices.append(("--base-url URL", "an OpenAI-compatible server"))
        raise ConfigurationError(_NO_OLLAMA.format(
            url=url, reason=exc.strerror or exc, model=model,
            choices="\n".join(f"  {flag:<32} {text}" for flag, text in choices),
            openai=_facts(Provider.OPENAI).default_model)) from None


def _read_bounded(stream: typing.BinaryIO, what: str, limit: int) -> bytes:
    """At most ``limit`` bytes of ``stream``: a larger input (``/dev/zero``) is refused
    after reading one byte more, not once memory runs out."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ConfigurationError(f"{what} is larger than {limit // (1 << 20)} MiB")
    return data


def _decoded(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                                 f"offset {exc.start})") from None


def _read_input(path: str, what: str) -> str:
    """A text file the command line was given, bounded and decoded; errors name it."""
    try:
        with open(path, "rb") as f:
            return _decoded(_read_bounded(f, what, MAX_INPUT_SIZE), what)
    except OSError as exc:
        raise ConfigurationError(f"{what}: {exc.strerror or exc}") from exc


def _read_stdin(stdin: typing.TextIO) -> str:
    """Piped standard input as text, bounded like a file."""
    what = "standard input"
    buffer = getattr(stdin, "buffer", None)
    try:
        if buffer is None:  # a text stream without bytes under it (tests, embedding)
            text = stdin.read(MAX_INPUT_SIZE + 1)
            if len(text) > MAX_INPUT_SIZE:
                raise ConfigurationError(f"{what} is larger than "
                                         f"{MAX_INPUT_SIZE // (1 << 20)} MiB")
            return text
        return _decoded(_read_bounded(buffer, what, MAX_INPUT_SIZE), what)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(f"could not read {what}: {exc}") from exc


def _load_json(text: str, what: str) -> Any:
    """JSON the user gave; nesting too deep for Python is an error that names it."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(f"{what}: {exc}") from exc
    except RecursionError:
        raise ConfigurationError(f"{what}: JSON nested too deeply") from None


def _response_format(opts: argparse.Namespace) -> Any:
    """``"text"``, ``"json"`` or the --schema dict (compiled now, so a bad one is a usage error)."""
    if opts.json:
        return "json"
    if opts.schema is None:
        return "text"
    text = opts.schema
    if not text.lstrip().startswith("{"):
        text = _read_input(text, f"--schema {text!r}")
    schema = _load_json(text, "--schema")
    try:
        if isinstance(schema, dict):
            _resolve_response_format(schema)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"--schema: {exc}") from exc
    except RecursionError:
        raise ConfigurationError("--schema: nested too deeply") from None
    if not isinstance(schema, dict):
        raise ConfigurationError(f"--schema: a JSON Schema is an object, got {_short(schema)}")
    return schema


def _image(arg: str, stdin: typing.TextIO) -> ImageContent:
    """An image from a path, a URL or ``-`` (stdin's bytes)."""
    what = f"--attach {arg!r}"
    if arg.startswith(("http://", "https://", "data:")):
        return ImageContent(source=arg)
    try:
        if arg == "-":
            data = _read_bounded(stdin.buffer, "the image on standard input", MAX_IMAGE_SIZE)
        else:
            with open(arg, "rb") as f:
                data = _read_bounded(f, what, MAX_IMAGE_SIZE)
    except OSError as exc:
        raise ConfigurationError(f"{what}: {exc.strerror or exc}") from exc
    import mimetypes
    media_type = _sniff_media_type_bytes(data) or (None if arg == "-" else
                                                   mimetypes.guess_type(arg)[0])
    if not (media_type or "").startswith("image/"):
        raise ConfigurationError(f"{what}: not an image (PNG, JPEG, GIF or WebP)")
    return ImageContent.from_bytes(data, media_type)


def _read_text(path: str) -> str:
    return _read_input(path, f"--file {path!r}")


def _load_functions(paths: list[str]) -> list[Callable[..., Any]]:
    """``--functions``: the public functions each file defines, as tools."""
    import importlib.util
    functions: list[Callable[..., Any]] = []
    for path in paths:
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        spec = importlib.util.spec_from_file_location(f"casual_llm_functions_{stem}", path)
        if spec is None or spec.loader is None or not os.path.isfile(path):
            raise ConfigurationError(f"--functions {path!r}: no such Python file")
        if os.path.getsize(path) > MAX_INPUT_SIZE:
            raise ConfigurationError(f"--functions {path!r} is larger than "
                                     f"{MAX_INPUT_SIZE // (1 << 20)} MiB")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and the like look their module up
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigurationError(f"--functions {path!r}: {type(exc).__name__}: {exc}"
                                     ) from exc
        found = [f for name, f in vars(module).items() if not name.startswith("_")
                 and inspect.isfunction(f) and f.__module__ == module.__name__]
        if not found:
            raise ConfigurationError(f"--functions {path!r}: no public function in it")
        try:
            for function in found:
                Tool.from_function(function)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"--functions {path!r}: {exc}") from exc
        functions += found
    return functions


def _call_text(call: AssistantToolCall) -> str:
    """``get_weather(city='Paris')``, as the command line shows a call."""
    try:
        arguments = ", ".join(f"{k}={v!r}" for k, v in call.function.parse_arguments().items())
    except ValueError:
        arguments = _shorten(call.function.arguments, 200)
    return f"{call.function.name}({arguments})"


def _user_message(text: str, images: list[ImageContent]) -> UserMessage:
    if not images:
        return UserMessage(content=text)
    parts: list[TextContent | ImageContent] = [TextContent(text=text)] if text else []
    return UserMessage(content=[*parts, *images])


def _usage_text(usage: Usage | None) -> str:
    if usage is None:
        return "not reported"

    def details(*parts: tuple[int | None, str]) -> str:
        shown = [f"{count} {what}" for count, what in parts if count]
        return f" ({', '.join(shown)})" if shown else ""
    return (f"{usage.prompt_tokens} in"
            + details((usage.cached_tokens, "cached"),
                      (usage.cache_write_tokens, "written to cache"))
            + f" + {usage.completion_tokens} out" + details((usage.reasoning_tokens, "reasoning"))
            + f" = {usage.total_tokens} tokens")


class _Session:
    """One run: the model, the conversation, and where text goes."""

    def __init__(self, opts: argparse.Namespace, prog: str) -> None:
        self.opts, self.prog = opts, prog
        self.stdin, self.out, self.err = sys.stdin, sys.stdout, sys.stderr
        for stream in (self.out, self.err):
            # A reply may hold characters the terminal's encoding cannot show (a Windows
            # console, a cp1252 pipe): show a replacement instead of failing the chat.
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(errors="replace")
        self.initial = self.target = _initial_target(opts)
        self.format = _response_format(opts)
        self.functions = _load_functions(opts.functions)
        self.client, self.model = _connect(self.target, opts)
        self.streaming = opts.stream and self.format == "text" and not opts.output_json
        self.system: str | None = opts.system
        self.history: list[ChatMessage] = []
        self.pending: list[ImageContent] = []  # /attach: images for the next message
        self.last_user: UserMessage | None = None
        self.last_usage: Usage | None = None
        self.total = Usage(prompt_tokens=0, completion_tokens=0)
        self.done = False
        self.interactive = self.stdin.isatty()
        self.color = _env("NO_COLOR") is None and os.environ.get("TERM") != "dumb"
        self.readline = False

    def run(self) -> int:
        if self.opts.list_models:
            return self._list_models()
        images = [_image(arg, self.stdin) for arg in self.opts.attach]
        text = self._prompt_text()
        chat = self.opts.interactive or (text is None and self.interactive)
        if text is None and (not chat or self.opts.dry_run):
            raise ConfigurationError("no prompt: give it as arguments or on stdin, or run at "
                                     "a terminal for a chat (--help shows how)")
        if chat and self.opts.output_json:
            raise ConfigurationError("--output-json prints one answer: give a prompt, not -i")
        first = None if text is None else _user_message(text, images)
        if first is not None and self.opts.dry_run:
            return self._dry_run(first)
        if self.target.default_ollama:
            _check_ollama(self.opts.timeout, self.target.model)
        if not chat:
            assert first is not None
            self._one_shot(first)
            return 0
        self.pending = [] if first is not None else images
        return self._chat(first)

    def _prompt_text(self) -> str | None:
        """Piped stdin first, then -f files, then the prompt words; ``None`` when empty."""
        parts = []
        reads_stdin = not (self.opts.interactive or self.interactive or "-" in self.opts.attach)
        if reads_stdin:
            parts.append(_read_stdin(self.stdin).rstrip())
        parts += [_read_text(path).rstrip() for path in self.opts.files]
        parts.append(" ".join(self.opts.prompt))
        text = "\n\n".join(part for part in parts if part.strip())
        return text or None

    def _messages(self) -> list[ChatMessage]:
        system: list[ChatMessage] = [SystemMessage(content=self.system)] if self.system else []
        return system + self.history

    def _list_models(self) -> int:
        """--list-models: one name per line, so it pipes (one JSON record with --output-json)."""
        if self.opts.prompt or self.opts.dry_run or self.opts.interactive:
            raise ConfigurationError("--list-models goes alone: no prompt, -i or --dry-run")
        models = self.client.list_models()
        if self.opts.output_json:
            self._write(json.dumps({"models": [{"name": name, "details": name.details}
                                               for name in models]}, ensure_ascii=False) + "\n")
        else:
            self._write("".join(f"{name}\n" for name in models))
        if not models:
            self._note("(the server lists no models)")
        return 0

    # -- one answer ------------------------------------------------------------

    def _one_shot(self, user: UserMessage) -> None:
        reply = self._answer(user)
        if self.opts.output_json:
            record: dict[str, Any] = {"model": str(self.target), "content": reply.content}
            if reply.reasoning:
                record["reasoning"] = reply.reasoning
            if self.format != "text":
                record["parsed"] = reply.parsed
            record["finish_reason"] = reply.finish_reason
            record["usage"] = self.last_usage.to_dict() if self.last_usage else None
            self._write(json.dumps(record, ensure_ascii=False) + "\n")

    def _answer(self, user: UserMessage) -> AssistantMessage:
        """Send the conversation plus ``user``, show the reply, keep both in the history."""
        self.last_user = user
        pieces: list[str] = []
        conversation = [*self._messages(), user]
        start = len(conversation) - 1
        try:
            if self.functions:
                reply = self._run(conversation, pieces)
            else:
                reply = self._reply(conversation, pieces)
                conversation.append(reply)
        except KeyboardInterrupt:
            if self.functions:  # the turns that finished, up to the interrupted one
                self.history += conversation[start:_complete_turns(conversation)]
            elif pieces:  # the history keeps what the screen shows
                self.history += [user, AssistantMessage(content="".join(pieces))]
            raise
        self.history += conversation[start:]
        self.last_usage = self.model.get_usage()
        if self.last_usage is not None:
            self.total = self.total + self.last_usage
        if reply.finish_reason == "length":
            self._note("(the reply stopped at the token limit while thinking, before any "
                       "answer; raise --max-tokens)" if reply.reasoning and not (
                           reply.content or reply.tool_calls) else
                       "(the reply stopped at the token limit; see --max-tokens)")
        if self.opts.usage:
            self._note(f"usage: {_usage_text(self.last_usage)}; "
                       f"session: {_usage_text(self.total)}")
        return reply

    def _reply(self, messages: list[ChatMessage], pieces: list[str]) -> AssistantMessage:
        max_tokens = self.opts.max_tokens
        if not self.streaming:
            reply = self.model.chat_sync(messages, response_format=self.format,
                                         max_tokens=max_tokens)
            if not self.opts.output_json:
                if reply.reasoning:
                    self._thinking(reply.reasoning, end=True)
                text = ((reply.content or "") if self.format == "text" else
                        json.dumps(reply.parsed, ensure_ascii=False, indent=2))
                self._write(text if text.endswith("\n") else text + "\n")
            return reply
        chunks = self.model.stream_sync(messages, max_tokens=max_tokens)
        final = None
        thinking = False  # thinking shown, not yet ended by a line break
        try:
            for chunk in chunks:
                if chunk.reasoning:
                    thinking = self._thinking(chunk.reasoning)
                if chunk.content:
                    if thinking:
                        thinking = self._thinking("", end=True)
                    pieces.append(chunk.content)
                    self._write(chunk.content)
                final = chunk.message or final
        except BaseException:
            if pieces and not pieces[-1].endswith("\n"):
                self._write("\n")
            raise
        finally:
            close = getattr(chunks, "close", None)  # a Ctrl-C between chunks: close the socket
            if close is not None:
                close()
            if thinking:
                self._thinking("", end=True)
        if not pieces or not pieces[-1].endswith("\n"):
            self._write("\n")
        return final or AssistantMessage(content="".join(pieces))

    def _run(self, conversation: list[ChatMessage], pieces: list[str]) -> AssistantMessage:
        """An answer with tools: each call shown (and asked) on stderr, results too."""
        keywords: dict[str, Any] = dict(
            max_turns=self.opts.max_turns, approve=self._approve, response_format=self.format,
            max_tokens=self.opts.max_tokens)
        if not self.streaming:
            before = len(conversation)
            reply = self.model.run_sync(conversation, self.functions, **keywords)
            for result in conversation[before:]:
                if isinstance(result, ToolResultMessage):
                    self._result(result)
            if not self.opts.output_json:
                text = ((reply.content or "") if self.format == "text" else
                        json.dumps(reply.parsed, ensure_ascii=False, indent=2))
                self._write(text if text.endswith("\n") else text + "\n")
            return reply
        events = self.model.run_stream_sync(conversation, self.functions, **keywords)
        thinking = False
        try:
            for event in events:
                if isinstance(event, ToolEvent):
                    if event.result is not None:
                        self._result(event.result)
                elif event.reasoning:
                    thinking = self._thinking(event.reasoning)
                elif event.content:
                    if thinking:
                        thinking = self._thinking("", end=True)
                    pieces.append(event.content)
                    self._write(event.content)
                elif event.message is not None and pieces:
                    if not pieces[-1].endswith("\n"):
                        self._write("\n")
                    pieces.clear()
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            if thinking:
                self._thinking("", end=True)
        final = conversation[-1]
        assert isinstance(final, AssistantMessage)
        return final

    def _result(self, result: ToolResultMessage) -> None:
        self._note(("✗ " if result.is_error else "← ") + _shorten(result.content, 200))

    def _approve(self, call: AssistantToolCall) -> bool:
        """Show the call; run it with --yes, ask at a terminal, else refuse."""
        self._note(f"→ {_call_text(call)}")
        if self.opts.yes:
            return True
        if not self.stdin.isatty():
            self._note("(not run: no terminal to ask and no --yes)")
            return False
        self.err.write("run it? [y/N] ")
        self.err.flush()
        answer = self.stdin.readline()
        return answer.strip().lower() in ("y", "yes")

    def _thinking(self, text: str, end: bool = False) -> bool:
        """Show thinking, dimmed, on stderr (stdout carries only the answer); returns
        whether a line is left open."""
        if not self.opts.show_reasoning:
            return False
        if text:
            self.err.write(self._paint("2", text, self.err))
        if end:
            self.err.write("\n")
        self.err.flush()
        return not end

    def _dry_run(self, user: UserMessage) -> int:
        # Model._call is what chat and stream hand the client, merged and checked.
        call = self.model._call([*self._messages(), user], self.format, self.opts.max_tokens,
                                None, None, None, {})
        request = self.client._dry_run(call.model, call.messages, call, stream=self.streaming)
        if self.opts.output_json:
            self._write(json.dumps(request, ensure_ascii=False, indent=2) + "\n")
            return 0
        lines = [f"{request['method']} {request['url']}",
                 *(f"{name}: {value}" for name, value in request["headers"].items()), "",
                 json.dumps(request["body"], ensure_ascii=False, indent=2)]
        self._write("\n".join(lines) + "\n")
        return 0

    # -- output ----------------------------------------------------------------

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _paint(self, code: str, text: str, stream: typing.TextIO) -> str:
        if not (self.color and stream.isatty()):
            return text
        if self.readline and stream is self.out:  # readline must not count escapes as width
            return f"\001\x1b[{code}m\002{text}\001\x1b[0m\002"
        return f"\x1b[{code}m{text}\x1b[0m"

    def _note(self, text: str) -> None:
        self.err.write(self._paint("2", text, self.err) + "\n")
        self.err.flush()

    def _error(self, exc: BaseException) -> None:
        """An error inside a chat: one line, and the chat goes on."""
        line = "error: " + _one_line(exc, self.opts.api_key_env)
        self.err.write(self._paint("31", line, self.err) + "\n")
        self.err.flush()

    # -- chat --------------------------------------------------------------------

    def _chat(self, first: UserMessage | None) -> int:
        history_file = self._line_editing()
        if self.interactive:
            self._note(f"casual_llm {__version__}, chatting with {self.target}. /help for "
                       f"commands, {_FENCE} for several lines, Ctrl-D to leave.")
        try:
            if first is not None:
                self._chat_turn(first)
            while not self.done:
                try:
                    text, block = self._read()
                except EOFError:  # Ctrl-D
                    if self.interactive:
                        self.err.write("\n")
                    break
                except KeyboardInterrupt:
                    self.err.write("\n")
                    self._note("(Ctrl-D or /exit to leave)")
                    continue
                if not block and text.strip().startswith("/"):
                    self._command(text.strip())
                elif text.strip():
                    images, self.pending = self.pending, []
                    self._chat_turn(_user_message(text, images))
        finally:
            if history_file:
                import readline
                try:
                    readline.write_history_file(history_file)
                except OSError:
                    pass
        return 0

    def _chat_turn(self, user: UserMessage) -> None:
        try:
            self._answer(user)
        except KeyboardInterrupt:
            self._note("(interrupted)")
        except CasualLLMError as exc:
            self._error(exc)

    def _line_editing(self) -> str | None:
        """readline editing and history at a terminal; returns the history file."""
        if not (self.interactive and self.out.isatty()):
            return None
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input()
            return None
        self.readline = True
        path = _env("CASUAL_LLM_HISTORY") or os.path.expanduser("~/.casual_llm_history")
        readline.set_history_length(1000)
        try:
            readline.read_history_file(path)
        except OSError:
            pass
        return path

    def _input(self, prompt: str) -> str:
        if not self.interactive:
            return input()
        if self.out.isatty():
            return input(self._paint("1;32", prompt, self.out))
        self.err.write(prompt)  # stdout is redirected: it keeps only the replies
        self.err.flush()
        return input()

    def _read(self) -> tuple[str, bool]:
        """One message: a line, or the lines between two ``\"\"\"`` (whether it was a block)."""
        line = self._input(_PROMPT)
        if not line.lstrip().startswith(_FENCE):
            return line, False
        text, lines = line.lstrip()[len(_FENCE):], []
        while not text.rstrip().endswith(_FENCE):
            lines.append(text)
            text = self._input(_MORE)
        lines.append(text.rstrip()[:-len(_FENCE)])
        return "\n".join(lines).strip("\n"), True

    def _command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        entry = _CHAT_COMMANDS.get(name.lower())
        if entry is None:
            self._note(f"unknown command {name}; /help lists them (a message that starts "
                       f"with / goes between {_FENCE} lines)")
            return
        try:
            entry[0](self, arg.strip())
        except (CasualLLMError, OSError, ValueError) as exc:
            self._error(exc)

    def _cmd_help(self, arg: str) -> None:
        """list these commands"""
        names: dict[Callable[[_Session, str], None], list[str]] = {}
        for name, (handler, _) in _CHAT_COMMANDS.items():
            names.setdefault(handler, []).append(name)
        for handler, aliases in names.items():
            usage = f"{', '.join(aliases)} {_CHAT_COMMANDS[aliases[0]][1]}".rstrip()
            self._note(f"  {usage:<26} {handler.__doc__}")
        self._note(f"  {_FENCE} ... {_FENCE:<18} a message of several lines\n"
                   "  Ctrl-C stops a reply; Ctrl-D leaves.")

    def _cmd_exit(self, arg: str) -> None:
        """leave the chat (Ctrl-D too)"""
        self.done = True

    def _cmd_system(self, arg: str) -> None:
        """show the system prompt, set it, or remove it (-)"""
        if arg:
            self.system = None if arg == "-" else arg
        self._note(f"system: {self.system}" if self.system else "no system prompt")

    def _cmd_model(self, arg: str) -> None:
        """show the model, or switch to another"""
        if arg:
            provider, name = _split_model(arg)
            provider = provider or self.target.provider
            same = provider is self.initial.provider  # --base-url and --api-key-env go with it
            target = _Target(provider, name or _facts(provider).default_model,
                             self.initial.base_url if same else None,
                             self.initial.key_env if same else None)
            self.client, self.model = _connect(target, self.opts)
            self.target = target
        self._note(f"model: {self.target}")

    def _cmd_clear(self, arg: str) -> None:
        """forget the conversation (the system prompt stays)"""
        self.history, self.pending, self.last_user = [], [], None
        self._note("(conversation cleared)")

    def _cmd_attach(self, arg: str) -> None:
        """attach an image to the next message"""
        if arg:
            self.pending.append(_image(arg, self.stdin))
        self._note(f"{len(self.pending)} image(s) attached to the next message")

    def _cmd_retry(self, arg: str) -> None:
        """ask the last message again, for a new reply"""
        user = self.last_user
        if user is None:
            self._note("nothing to retry")
            return
        for index in range(len(self.history) - 1, -1, -1):
            if self.history[index] is user:
                del self.history[index:]
                break
        self._chat_turn(user)

    def _cmd_usage(self, arg: str) -> None:
        """tokens of the last reply and of the session"""
        self._note(f"last reply: {_usage_text(self.last_usage)}\n"
                   f"session:    {_usage_text(self.total)}")

    def _cmd_reasoning(self, arg: str) -> None:
        """show or hide the thinking; with LEVEL, set how hard the model thinks"""
        if not arg:
            self.opts.show_reasoning = not self.opts.show_reasoning
            self._note(f"thinking {'shown' if self.opts.show_reasoning else 'hidden'}")
            return
        try:
            self.model.reasoning = self.opts.reasoning = _reasoning_level(arg)
        except Exception:
            raise ValueError(f"/reasoning takes low, medium, high, a token budget, on or "
                             f"off, got {arg!r}") from None
        self._note(f"reasoning: {arg.strip().lower()}")

    def _cmd_save(self, arg: str) -> None:
        """save the conversation as JSON"""
        if not arg:
            raise ValueError("/save needs a file name")
        data = {"model": str(self.target),
                "messages": [m.to_dict(exclude_none=True) for m in self._messages()]}
        with open(arg, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
        self._note(f"saved {len(self.history)} messages to {arg}")

    def _cmd_load(self, arg: str) -> None:
        """continue a conversation saved with /save"""
        if not arg:
            raise ValueError("/load needs a file name")
        data = _load_json(_read_input(arg, arg), arg)
        raw = data.get("messages") if isinstance(data, dict) else data
        messages = _check_messages(raw if isinstance(raw, list) else None)
        head = messages[0] if messages else None
        system = head.content if isinstance(head, SystemMessage) else None
        if system is not None:
            messages = messages[1:]
        self.system, self.history, self.last_user = system, messages, None
        self._note(f"loaded {len(messages)} messages from {arg}")


# Name -> (handler, its arguments); /help is built from this and the docstrings.
_CHAT_COMMANDS: dict[str, tuple[Callable[[_Session, str], None], str]] = {
    "/help": (_Session._cmd_help, ""),
    "/exit": (_Session._cmd_exit, ""),
    "/quit": (_Session._cmd_exit, ""),
    "/bye": (_Session._cmd_exit, ""),
    "/system": (_Session._cmd_system, "[TEXT|-]"),
    "/model": (_Session._cmd_model, "[[PROVIDER:]MODEL]"),
    "/clear": (_Session._cmd_clear, ""),
    "/attach": (_Session._cmd_attach, "PATH|URL"),
    "/retry": (_Session._cmd_retry, ""),
    "/usage": (_Session._cmd_usage, ""),
    "/reasoning": (_Session._cmd_reasoning, "[LEVEL]"),
    "/save": (_Session._cmd_save, "FILE"),
    "/load": (_Session._cmd_load, "FILE"),
}


def _complete_turns(messages: list[ChatMessage]) -> int:
    """How many of ``messages`` to keep after an interrupted run: none of a turn whose
    tool calls have not all got their results."""
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if isinstance(message, AssistantMessage) and message.tool_calls:
            answered = sum(isinstance(m, ToolResultMessage) for m in messages[i + 1:])
            return len(messages) if answered >= len(message.tool_calls) else i
    return len(messages)


def _one_line(exc: BaseException, key_env: str | None) -> str:
    """An error as one line, with the provider's message and request id when it sent them."""
    if isinstance(exc, SchemaValidationError) and exc.errors:
        text = "the reply does not match the schema: " + "; ".join(
            f"{path}: {message}" for path, message in exc.errors[:5])
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, APIError):
        if exc.provider_message and exc.provider_message not in text:
            text += f": {exc.provider_message}"
        if exc.request_id and exc.request_id not in text:
            text += f" (request id {exc.request_id})"
    return _scrub_env(" ".join(text.split()), key_env)


def _scrub_env(text: str, key_env: str | None) -> str:
    """``text`` without any secret of the environment, should a server echo one: keys,
    tokens and the credentials in proxy and server URLs. Only the chosen key counts at
    any length: a variable such as ``SOME_KEY=1`` must not redact every digit 1."""
    secrets: set[str] = set()
    for name, value in os.environ.items():
        if name == key_env or (_SECRET_NAME.search(name) and len(value.strip()) >= 6):
            secrets.add(value.strip())
        elif "://" in value and "@" in value:
            secrets |= _secrets_in({}, value.strip())
    return _scrub(text, {s for s in secrets if s})


def _report(exc: Exception, opts: argparse.Namespace, prog: str,
            session: _Session | None) -> int:
    """Print what failed (one line; a traceback with --debug) and return the exit code."""
    code = next((c for cls, c in _EXIT_CODES if isinstance(exc, cls)), 1)
    if opts.debug:
        import traceback
        sys.stderr.write(_scrub_env("".join(traceback.format_exception(exc)), opts.api_key_env))
    if isinstance(exc, ConfigurationError):  # may span lines: it says how to fix things
        message = _scrub_env(str(exc), opts.api_key_env)
    else:
        message = _one_line(exc, opts.api_key_env)
        if not isinstance(exc, (CasualLLMError, OSError)):
            message = f"{type(exc).__name__}: {message} (--debug shows the traceback)"
    sys.stderr.write(f"{prog}: error: {message}\n")
    if opts.output_json and session is not None:
        record = {"type": type(exc).__name__, "message": message,
                  "status_code": getattr(exc, "status_code", None),
                  "request_id": getattr(exc, "request_id", None),
                  "raw_text": getattr(exc, "raw_text", None)}
        session._write(json.dumps({"model": str(session.target), "error": record},
                                  ensure_ascii=False) + "\n")
    return code


def _debug_logging(stream: typing.TextIO) -> logging.Handler:
    import logging
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("casual_llm: debug: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return handler


def _silence(stream: typing.TextIO) -> None:
    """After a broken pipe, point stdout at /dev/null so the final flush stays quiet."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file: nothing to flush later
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
