"""Build clients and models from settings: ClientConfig, ModelConfig and the factories.

The settings could come from a JSON or TOML file; here they are a dict. A client's ``name``
picks its key variable: name="openrouter" reads OPENROUTER_API_KEY.

    OPENAI_API_KEY=sk-... OPENROUTER_API_KEY=sk-or-... python -m examples.config_classes
"""

import os

from casual_llm import ClientConfig, ModelConfig, UserMessage, create_client, create_model

SETTINGS = {
    "clients": {
        "openai": {"provider": "openai", "timeout": 60},
        "openrouter": {"provider": "openai", "name": "openrouter", "max_retries": 3,
                       "base_url": os.environ.get("OPENROUTER_BASE_URL",
                                                  "https://openrouter.ai/api/v1")},
        "local": {"provider": "ollama"},  # OLLAMA_HOST, else http://localhost:11434
    },
    "models": {
        "fast": {"client": "openai", "name": "gpt-4.1-mini", "temperature": 0.2},
        "open": {"client": "openrouter", "name": "meta-llama/llama-3.3-70b-instruct"},
        "private": {"client": "local", "name": "llama3.2", "extra_kwargs": {"num_ctx": 8192}},
    },
}


def build_models(settings: dict) -> dict:
    clients = {key: create_client(ClientConfig(**value))
               for key, value in settings["clients"].items()}
    models = {}
    for key, value in settings["models"].items():
        value = dict(value)
        client = clients[value.pop("client")]
        models[key] = create_model(client, ModelConfig(**value))
    return models


def main() -> None:
    models = build_models(SETTINGS)
    for key, model in models.items():
        reply = model.chat_sync([UserMessage(content="Reply with one word: ready?")])
        print(f"{key:8} {model!r}: {reply.content}")
    print(ClientConfig(provider="openai", api_key="sk-a-real-looking-secret"))  # key masked


if __name__ == "__main__":
    main()
