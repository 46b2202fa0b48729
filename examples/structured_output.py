"""Structured output: the reply parsed into a dataclass, validated, re-asked when wrong.

    OPENAI_API_KEY=sk-... python -m examples.structured_output
"""

import os
from dataclasses import dataclass, field
from enum import Enum

from casual_llm import (
    AnthropicClient,
    Model,
    OllamaClient,
    OpenAIClient,
    SchemaValidationError,
    UserMessage,
)

CLIENTS = {"openai": (OpenAIClient, "gpt-4.1-mini"),
           "anthropic": (AnthropicClient, "claude-sonnet-4-5"),
           "ollama": (OllamaClient, "llama3.2")}


class Genre(Enum):
    FICTION = "fiction"
    NON_FICTION = "non-fiction"


@dataclass
class Book:
    """A book, as the model should describe it."""

    title: str
    author: str
    year: int
    genre: Genre
    themes: list[str] = field(default_factory=list)


def main() -> None:
    client_class, default_model = CLIENTS[os.environ.get("PROVIDER", "openai")]
    model = Model(client_class(), name=os.environ.get("MODEL", default_model))
    try:
        reply = model.chat_sync(
            [UserMessage(content="Describe the novel 'Nineteen Eighty-Four'.")],
            response_format=Book, validation_retries=2)
    except SchemaValidationError as exc:
        print("the model never matched the schema:", exc.errors, exc.raw_text)
        raise SystemExit(1) from exc
    book = reply.parsed  # a Book, with genre a Genre
    print(f"{book.title} by {book.author} ({book.year}), {book.genre.value}")
    print("themes:", ", ".join(book.themes))

    # A list of values, a JSON Schema dict, or "json" work the same way:
    reply = model.chat_sync([UserMessage(content="Three primary colours, as a JSON list.")],
                            response_format=list[str])
    print(reply.parsed)


if __name__ == "__main__":
    main()
