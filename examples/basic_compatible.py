"""Chat with any OpenAI-compatible server: vLLM, llama.cpp, LM Studio, Ollama's /v1.

Set OPENAI_BASE_URL to the server's /v1; a server other than api.openai.com needs no key.

    OPENAI_BASE_URL=http://localhost:8080/v1 python -m examples.basic_compatible
"""

import os

from casual_llm import Model, OpenAIClient, UserMessage

MODEL = os.environ.get("OPENAI_MODEL", "local-model")


def main() -> None:
    client = OpenAIClient()  # base URL from OPENAI_BASE_URL; a key only if OPENAI_API_KEY is set
    model = Model(client, name=MODEL)
    reply = model.chat_sync([UserMessage(content="Name three prime numbers.")], max_tokens=100)
    print(reply.content)


if __name__ == "__main__":
    main()
