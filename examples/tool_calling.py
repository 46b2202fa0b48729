"""A complete tool-calling loop: the model asks, the code runs the function, the result goes
back, the model answers. Works with every provider: PROVIDER=openai|anthropic|ollama.

    OPENAI_API_KEY=sk-... python -m examples.tool_calling
"""

import json
import os
from datetime import datetime, timezone

from casual_llm import (
    AnthropicClient,
    Model,
    OllamaClient,
    OpenAIClient,
    Tool,
    ToolResultMessage,
    UserMessage,
)

CLIENTS = {"openai": (OpenAIClient, "gpt-4.1-mini"),
           "anthropic": (AnthropicClient, "claude-sonnet-4-5"),
           "ollama": (OllamaClient, "llama3.2")}


def get_weather(city: str, unit: str = "celsius") -> dict:
    """Get the current weather in a city.

    Args:
        city: The city, e.g. "Paris".
        unit: "celsius" or "fahrenheit".
    """
    temperature = {"paris": 18, "rome": 24}.get(city.lower(), 20)
    if unit == "fahrenheit":
        temperature = round(temperature * 9 / 5 + 32)
    return {"city": city, "temperature": temperature, "unit": unit}


def utc_now() -> str:
    """The current date and time in UTC, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


FUNCTIONS = {f.__name__: f for f in (get_weather, utc_now)}
TOOLS = [Tool.from_function(f) for f in FUNCTIONS.values()]


def run_tool(name: str, arguments: dict) -> str:
    """Run one call; errors go back to the model as text instead of crashing the loop."""
    try:
        return json.dumps(FUNCTIONS[name](**arguments))
    except Exception as exc:  # the model reads the error and may retry
        return json.dumps({"error": f"{type(exc).__name__}: {exc}"})


def main() -> None:
    client_class, default_model = CLIENTS[os.environ.get("PROVIDER", "openai")]
    model = Model(client_class(), name=os.environ.get("MODEL", default_model))
    messages = [UserMessage(content="Is it warmer in Paris or in Rome right now?")]

    for _ in range(5):  # a bound, in case the model keeps asking
        reply = model.chat_sync(messages, tools=TOOLS)
        messages.append(reply)
        if not reply.tool_calls:
            break
        for call in reply.tool_calls:
            arguments = call.function.parse_arguments()
            print(f"-> {call.function.name}({arguments})")
            messages.append(ToolResultMessage(name=call.function.name, tool_call_id=call.id,
                                              content=run_tool(call.function.name, arguments)))
    print(reply.content)
    print(f"[{model.total_usage.total_tokens} tokens in {len(messages)} messages]")


if __name__ == "__main__":
    main()
