"""Chat with OpenAI, async and blocking.

Reads OPENAI_API_KEY (and OPENAI_BASE_URL when set); the model from OPENAI_MODEL.

    OPENAI_API_KEY=sk-... python -m examples.basic_openai
"""

import asyncio
import os

from casual_llm import Model, OpenAIClient, SystemMessage, UserMessage

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4.1-mini")


async def main() -> None:
    model = Model(OpenAIClient(), name=MODEL, temperature=0.2)
    reply = await model.chat([
        SystemMessage(content="Answer in one sentence."),
        UserMessage(content="What is the difference between a list and a tuple in Python?"),
    ])
    print(reply.content)
    print(f"[{reply.finish_reason}; {model.get_usage()}]")

    # The blocking twin, for scripts and notebooks:
    reply = model.chat_sync([UserMessage(content="Say hello in Norwegian.")])
    print(reply.content)


if __name__ == "__main__":
    asyncio.run(main())
