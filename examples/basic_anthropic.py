"""Chat with Anthropic.

Reads ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL when set); the model from ANTHROPIC_MODEL.

    ANTHROPIC_API_KEY=sk-ant-... python -m examples.basic_anthropic
"""

import os

from casual_llm import AnthropicClient, Model, SystemMessage, UserMessage

MODEL = os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-5")


def main() -> None:
    model = Model(AnthropicClient(), name=MODEL)
    messages = [
        SystemMessage(content="You are a concise assistant."),
        SystemMessage(content="Use British spelling."),  # every system message is sent
        UserMessage(content="What colour is the sky on Mars?"),
    ]
    reply = model.chat_sync(messages, max_tokens=300)
    print(reply.content)
    print(f"[{reply.finish_reason}; {model.get_usage()}]")


if __name__ == "__main__":
    main()
