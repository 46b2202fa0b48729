"""Chat with a local Ollama.

Reads OLLAMA_HOST (default http://localhost:11434); the model from OLLAMA_MODEL.

    ollama pull llama3.2 && python -m examples.basic_ollama
"""

import os

from casual_llm import Model, OllamaClient, UserMessage

MODEL = os.environ.get("OLLAMA_MODEL", "llama3.2")


def main() -> None:
    model = Model(OllamaClient(), name=MODEL, temperature=0)
    # Ollama model parameters (num_ctx, top_p, seed, ...) go into its "options".
    reply = model.chat_sync([UserMessage(content="Why is the sea salty?")], num_ctx=4096)
    print(reply.content)
    print(f"[{reply.finish_reason}; {model.get_usage()}]")


if __name__ == "__main__":
    main()
