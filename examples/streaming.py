"""Stream a reply: text as it arrives, then the finish reason and the usage.

Works with any provider; pick it with PROVIDER=openai|anthropic|ollama (default openai).

    OPENAI_API_KEY=sk-... python -m examples.streaming
"""

import asyncio
import os

from casual_llm import AnthropicClient, Model, OllamaClient, OpenAIClient, UserMessage

CLIENTS = {"openai": (OpenAIClient, "gpt-4.1-mini"),
           "anthropic": (AnthropicClient, "claude-sonnet-4-5"),
           "ollama": (OllamaClient, "llama3.2")}


def make_model() -> Model:
    client_class, default_model = CLIENTS[os.environ.get("PROVIDER", "openai")]
    return Model(client_class(), name=os.environ.get("MODEL", default_model))


async def main() -> None:
    model = make_model()
    final = None
    async for chunk in model.stream([UserMessage(content="Tell a two-line story about a cat.")]):
        print(chunk.content, end="", flush=True)
        final = chunk
    print()
    print(f"[finish: {final.finish_reason}; usage: {final.usage}]")

    # Blocking streaming, same chunks:
    for chunk in model.stream_sync([UserMessage(content="Now one about a dog.")], max_tokens=60):
        print(chunk.content, end="", flush=True)
    print()
    print(f"[finish: {chunk.finish_reason}; last usage: {model.get_usage()}]")


if __name__ == "__main__":
    asyncio.run(main())
