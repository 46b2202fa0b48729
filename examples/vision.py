"""Send images: a URL, base64 data, and a local file.

    OPENAI_API_KEY=sk-... python -m examples.vision photo.jpg

With PROVIDER=ollama the URL is downloaded by casual_llm itself (public addresses only).
"""

import base64
import os
import sys

from casual_llm import (
    AnthropicClient,
    ImageContent,
    Model,
    OllamaClient,
    OpenAIClient,
    TextContent,
    UserMessage,
)

CLIENTS = {"openai": (OpenAIClient, "gpt-4.1-mini"),
           "anthropic": (AnthropicClient, "claude-sonnet-4-5"),
           "ollama": (OllamaClient, "llava")}
IMAGE_URL = ("https://upload.wikimedia.org/wikipedia/commons/4/47/"
             "PNG_transparency_demonstration_1.png")


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "photo.png"
    client_class, default_model = CLIENTS[os.environ.get("PROVIDER", "openai")]
    model = Model(client_class(), name=os.environ.get("MODEL", default_model))

    with open(path, "rb") as f:
        data = f.read()
    images = [
        ImageContent(source=IMAGE_URL),  # a URL
        ImageContent(source={"type": "base64", "data": base64.b64encode(data).decode()},
                     media_type="image/png"),  # base64 data (the type is read from the bytes)
        ImageContent.from_path(path),  # a local file
    ]
    reply = model.chat_sync([UserMessage(content=[
        TextContent(text="Describe each of these images in one line."), *images])])
    print(reply.content)


if __name__ == "__main__":
    main()
