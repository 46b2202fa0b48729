"""Structured output: validating a ~5 KB reply, and deriving a schema from a dataclass.

    python benchmarks/bench_validate.py [--quick]

Validates a typical structured reply (an object with a dozen fields and an array
of 30 objects with strings, enums, numbers, nested objects and optional fields)
against its schema with ``casual_llm.validate_json_schema``, and with the
``jsonschema`` package's Draft202012Validator when it is installed; both
validators are built once beforehand. Then the dataclass path ``Model.chat``
takes for ``response_format=Order``: the schema and parser derived from the
type (first call on a new type, then cached), and parsing the reply text into
``Order`` objects. Those use casual_llm's private helpers, named in the output.
"""

# No "from __future__ import annotations": the dataclasses below are built inside a function,
# where string annotations could not be resolved.
import argparse
import dataclasses
import enum
import functools
import importlib
import json
import os
import sys
import timeit
from typing import Any, Literal, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
casual_llm = importlib.import_module("casual_llm")  # from the root just put on the path

ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "minLength": 1, "maxLength": 80},
        "category": {"type": "string", "enum": ["book", "film", "music", "game", "other"]},
        "price": {"type": "number", "minimum": 0},
        "rating": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 5}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "in_stock": {"type": "boolean"},
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "dimensions": {"$ref": "#/$defs/Dimensions"},
    },
    "required": ["id", "name", "category", "price", "rating", "tags", "in_stock", "sku",
                 "dimensions"],
    "additionalProperties": False,
}

SCHEMA = {
    "$defs": {
        "Item": ITEM,
        "Dimensions": {
            "type": "object",
            "properties": {"width": {"type": "number"}, "height": {"type": "number"},
                           "unit": {"type": "string", "enum": ["cm", "in"]}},
            "required": ["width", "height", "unit"],
            "additionalProperties": False,
        },
    },
    "type": "object",
    "properties": {
        "request_id": {"type": "string"},
        "customer": {"type": "string"},
        "status": {"type": "string", "enum": ["ok", "partial", "failed"]},
        "total": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        "page": {"type": "integer"},
        "pages": {"type": "integer"},
        "summary": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "created": {"type": "string", "format": "date-time"},
        "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 100},
    },
    "required": ["request_id", "customer", "status", "total", "currency", "page", "pages",
                 "summary", "confidence", "warnings", "created", "items"],
    "additionalProperties": False,
}


def make_reply() -> dict[str, Any]:
    items = [
        {
            "id": i + 1,
            "name": f"Item {i}",
            "category": ["book", "film", "music", "game", "other"][i % 5],
            "price": 9.99 + i,
            "rating": None if i % 4 == 0 else (i % 5) + 0.5 if i % 5 < 4 else 4,
            "tags": ["new", "sale"][: i % 3],
            "in_stock": i % 2 == 0,
            "sku": f"ABC-{1000 + i}",
            "dimensions": {"width": 10 + i, "height": 20.5, "unit": "cm"},
        }
        for i in range(30)
    ]
    return {
        "request_id": "req-123", "customer": "Jane Doe", "status": "ok", "total": 1234.5,
        "currency": "EUR", "page": 1, "pages": 3, "summary": "Thirty items matched the query.",
        "confidence": 0.87, "warnings": [], "created": "2024-05-01T12:00:00Z", "items": items,
    }


def order_types() -> type:
    """A new ``Order`` dataclass tree (new class objects, so no cache knows them yet)
    with the shape of ``SCHEMA``."""
    Category = enum.Enum("Category", {n.upper(): n for n in
                                      ("book", "film", "music", "game", "other")})

    @dataclasses.dataclass
    class Dimensions:
        width: float
        height: float
        unit: Literal["cm", "in"]

    @dataclasses.dataclass
    class Item:
        id: int
        name: str
        category: Category  # type: ignore[valid-type]
        price: float
        rating: Optional[float]  # noqa: UP045 - the spelling most user code has
        tags: list[str]
        in_stock: bool
        sku: str
        dimensions: Dimensions

    @dataclasses.dataclass
    class Order:
        request_id: str
        customer: str
        status: Literal["ok", "partial", "failed"]
        total: float
        currency: Literal["EUR", "USD", "GBP"]
        page: int
        pages: int
        summary: str
        confidence: float
        warnings: list[str]
        created: str
        items: list[Item]

    return Order


def _best_us(fn: Any, number: int, repeat: int = 5) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def _validation(number: int) -> None:
    reply = make_reply()
    size = len(json.dumps(reply, separators=(",", ":")))
    print(f"Validating one reply: {size:,} bytes of compact JSON, 30 items; best of 5 rounds")
    casual_llm.validate_json_schema(reply, SCHEMA)  # compiles and caches
    runs = {"casual_llm validate_json_schema": lambda: casual_llm.validate_json_schema(
        reply, SCHEMA)}
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        theirs = jsonschema.Draft202012Validator(SCHEMA)
        theirs.validate(reply)
        runs["jsonschema validator.validate"] = lambda: theirs.validate(reply)
        runs["jsonschema validator.is_valid"] = lambda: theirs.is_valid(reply)
    # jsonschema is about ten times slower: a tenth of the runs keeps the time down.
    best = {name: _best_us(fn, number if name.startswith("casual") else max(1, number // 10))
            for name, fn in runs.items()}
    for name, us in best.items():
        print(f"  {name:36} {us:9.1f} us per reply")
    ours = best["casual_llm validate_json_schema"]
    if jsonschema is None:
        print("  jsonschema rows skipped: the jsonschema package is not installed")
    else:
        print(f"  casual_llm is {best['jsonschema validator.validate'] / ours:.1f}x as fast as "
              f"validate, {best['jsonschema validator.is_valid'] / ours:.1f}x as is_valid")
    first = []
    for _ in range(5):
        schema = json.loads(json.dumps(SCHEMA))  # a new object: the compile cache misses
        first.append(_best_us(functools.partial(casual_llm.validate_json_schema, reply, schema),
                              1, 1))
    print(f"  first validation against a new schema object (compiles it): "
          f"{min(first):,.0f} us")


def _dataclass_path(number: int) -> None:
    resolve = casual_llm._resolve_response_format
    schema_of = casual_llm._schema_from_type
    print("\nThe dataclass path of Model.chat(response_format=Order), Order shaped like the "
          "schema above:")
    firsts = [_best_us(functools.partial(schema_of, order_types()), 1, 1) for _ in range(5)]
    order = order_types()
    schema_of(order)
    print(f"  {'_schema_from_type(Order), first call':52} {min(firsts):9.1f} us")
    print(f"  {'_schema_from_type(Order), cached (returns a copy)':52} "
          f"{_best_us(lambda: schema_of(order), number):9.1f} us")
    firsts = [_best_us(functools.partial(resolve, order_types()), 1, 1) for _ in range(5)]
    print(f"  {'_resolve_response_format(Order), first call':52} {min(firsts):9.1f} us")
    fmt = resolve(order)
    print(f"  {'_resolve_response_format(Order), cached':52} "
          f"{_best_us(lambda: resolve(order), number):9.1f} us")
    text = json.dumps(make_reply())
    parsed = fmt.parse(text)
    assert isinstance(parsed, order) and len(parsed.items) == 30
    print(f"  {'reply text -> validated Order (fmt.parse)':52} "
          f"{_best_us(lambda: fmt.parse(text), max(1, number // 4)):9.1f} us")
    print(f"  {'  of which json.loads':52} {_best_us(lambda: json.loads(text), number):9.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, rougher figures")
    args = parser.parse_args()
    number = 30 if args.quick else 300
    _validation(number)
    _dataclass_path(number)


if __name__ == "__main__":
    main()
