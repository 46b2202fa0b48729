"""Track token usage across several models and providers, and what it cost.

Set PRICES to your own prices (per million tokens, input and output).

    OPENAI_API_KEY=sk-... ANTHROPIC_API_KEY=sk-ant-... python -m examples.usage_tracking
"""

import os

from casual_llm import AnthropicClient, Model, OpenAIClient, Usage, UserMessage

# Per million tokens: (input, output). Made-up numbers: put your contract's prices here.
PRICES = {"gpt-4.1-mini": (0.40, 1.60), "claude-sonnet-4-5": (3.00, 15.00)}


def cost(model: Model) -> float:
    price_in, price_out = PRICES.get(model.name, (0.0, 0.0))
    usage = model.total_usage
    return (usage.prompt_tokens * price_in + usage.completion_tokens * price_out) / 1e6


def main() -> None:
    draft = Model(OpenAIClient(), name=os.environ.get("OPENAI_MODEL", "gpt-4.1-mini"))
    review = Model(AnthropicClient(), name=os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-5"))

    text = draft.chat_sync([UserMessage(content="Write a two-line poem about tea.")]).content
    print("draft:", draft.get_usage())  # the last call's usage
    verdict = review.chat_sync([UserMessage(content=f"Rate this poem from 1 to 10:\n{text}")])
    print("review:", review.get_usage())
    for _chunk in draft.stream_sync([UserMessage(content=f"Improve it given: {verdict.content}")]):
        pass  # streams count too: the final chunk carries the usage
    print("draft again:", draft.get_usage())

    total = Usage(prompt_tokens=0, completion_tokens=0)
    for model in (draft, review):
        total = total + model.total_usage
        print(f"{model.name}: {model.total_usage.total_tokens} tokens, ${cost(model):.6f}")
    print(f"all models: {total.total_tokens} tokens")


if __name__ == "__main__":
    main()
