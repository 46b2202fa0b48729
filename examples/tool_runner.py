"""Tools that run: Model.run calls the model, runs the functions it asks for (together when
it asks for several, each after your approval), sends the results and stops at the answer.
Works with every provider: PROVIDER=openai|anthropic|ollama.

    OPENAI_API_KEY=sk-... python -m examples.tool_runner
"""

import asyncio
import os

from casual_llm import (
    AnthropicClient,
    MaxTurnsExceededError,
    Model,
    OllamaClient,
    OpenAIClient,
    StreamChunk,
    ToolEvent,
    UserMessage,
)

CLIENTS = {"openai": (OpenAIClient, "gpt-4.1-mini"),
           "anthropic": (AnthropicClient, "claude-sonnet-4-5"),
           "ollama": (OllamaClient, "llama3.2")}


async def get_weather(city: str) -> dict:
    """Get the current weather in a city.

    Args:
        city: The city, e.g. "Paris".
    """
    await asyncio.sleep(0.1)  # a real lookup goes here; several run at once
    return {"city": city, "temperature": {"paris": 18, "rome": 24}.get(city.lower(), 20)}


def book_table(restaurant: str, people: int) -> str:
    """Book a table (a side effect: the run asks first).

    Args:
        restaurant: Where.
        people: How many.
    """
    return f"booked {restaurant} for {people}"


def approve(call) -> bool:
    """Weather is harmless; bookings are not made without a person."""
    return call.function.name != "book_table"


def main() -> None:
    client_class, default_model = CLIENTS[os.environ.get("PROVIDER", "openai")]
    model = Model(client_class(), name=os.environ.get("MODEL", default_model))
    messages = [UserMessage(content="Is it warmer in Paris or in Rome right now?")]
    try:
        for event in model.run_stream_sync(messages, [get_weather, book_table],
                                           approve=approve, max_turns=5):
            if isinstance(event, ToolEvent) and event.result is None:
                print(f"-> {event.call.function.name}({event.call.function.arguments})")
            elif isinstance(event, ToolEvent):
                print(f"<- {event.result.content}")
            elif isinstance(event, StreamChunk) and event.content:
                print(event.content, end="", flush=True)
    except MaxTurnsExceededError as exc:
        print(f"\n[gave up after {exc.turns} turns]")
    print(f"\n[{len(messages)} messages; usage {model.get_usage()}]")


if __name__ == "__main__":
    main()
