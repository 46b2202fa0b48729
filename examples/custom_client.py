"""Write your own client: any object with async ``_chat`` and ``_stream`` works with Model.

This one tries a primary client and falls back to a second one when the first is down
(connection errors, 5xx, 429). Reads the same variables as the built-in clients.

    OPENAI_API_KEY=sk-... ANTHROPIC_API_KEY=sk-ant-... python -m examples.custom_client
"""

import os
from collections.abc import AsyncIterator

from casual_llm import (
    AnthropicClient,
    APIConnectionError,
    InternalServerError,
    Model,
    OpenAIClient,
    RateLimitError,
    StreamChunk,
    UserMessage,
)

DOWN = (APIConnectionError, InternalServerError, RateLimitError)


class FallbackClient:
    """Ask ``primary`` with its model name; if it is down, ask ``secondary`` with its own."""

    def __init__(self, primary, secondary, secondary_model: str) -> None:
        self.primary, self.secondary, self.secondary_model = primary, secondary, secondary_model
        self.fell_back = 0

    async def _chat(self, model, messages, response_format="text", max_tokens=None,
                    tools=None, temperature=None, **extra):
        try:
            return await self.primary._chat(model, messages, response_format, max_tokens,
                                            tools, temperature, **extra)
        except DOWN:
            self.fell_back += 1
            return await self.secondary._chat(self.secondary_model, messages, response_format,
                                              max_tokens, tools, temperature, **extra)

    async def _stream(self, model, messages, response_format="text", max_tokens=None,
                      tools=None, temperature=None, **extra) -> AsyncIterator[StreamChunk]:
        started = False
        try:
            async for chunk in self.primary._stream(model, messages, response_format,
                                                    max_tokens, tools, temperature, **extra):
                started = True
                yield chunk
            return
        except DOWN:
            if started:  # half an answer was already shown: do not start another one
                raise
            self.fell_back += 1
        async for chunk in self.secondary._stream(self.secondary_model, messages,
                                                  response_format, max_tokens, tools,
                                                  temperature, **extra):
            yield chunk


def main() -> None:
    client = FallbackClient(OpenAIClient(max_retries=0), AnthropicClient(),
                            os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-5"))
    model = Model(client, name=os.environ.get("OPENAI_MODEL", "gpt-4.1-mini"))
    reply = model.chat_sync([UserMessage(content="Say hi in one word.")])
    print(reply.content)
    for chunk in model.stream_sync([UserMessage(content="Count to three.")]):
        print(chunk.content, end="", flush=True)
    print()
    print(f"[fell back {client.fell_back} time(s); {model.total_usage}]")


if __name__ == "__main__":
    main()
