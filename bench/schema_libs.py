"""Which JSON Schema library for the hot path? Compile once, validate a typical LLM output, many times.

Candidates: jsonschema-rs (Rust core, Draft 2020-12), jsonschema (the reference Python implementation,
Draft 2020-12) and fastjsonschema (generates Python code; Drafts 4, 6 and 7 only, no 2020-12).
Usage: python bench/schema_libs.py
"""

from __future__ import annotations

import timeit

import fastjsonschema
import jsonschema
import jsonschema_rs
import orjson

SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "minLength": 1},
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4,}$"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "qty": {"type": "integer", "minimum": 1},
                    "price": {"type": "number"},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "minItems": 1,
        },
        "priority": {"enum": ["low", "normal", "high"]},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["customer", "order_id", "items", "priority"],
    "additionalProperties": False,
}
CONTENT = orjson.dumps(
    {
        "customer": "Ada Lovelace",
        "order_id": "UK-12345",
        "items": [{"sku": "A1", "qty": 2, "price": 9.5}, {"sku": "B7", "qty": 1, "price": 120.0}],
        "priority": "high",
        "notes": None,
    }
)


def main() -> None:
    rs = jsonschema_rs.validator_for(SCHEMA)
    py = jsonschema.Draft202012Validator(SCHEMA)
    fast = fastjsonschema.compile(SCHEMA)
    candidates = {
        "jsonschema-rs (parse with orjson, validate)": lambda: rs.is_valid(orjson.loads(CONTENT)),
        "jsonschema (parse with orjson, validate)": lambda: py.is_valid(orjson.loads(CONTENT)),
        "fastjsonschema (parse with orjson, validate)": lambda: fast(orjson.loads(CONTENT)),
    }
    compile_costs = {
        "jsonschema-rs": lambda: jsonschema_rs.validator_for(SCHEMA),
        "jsonschema": lambda: jsonschema.Draft202012Validator(SCHEMA),
        "fastjsonschema": lambda: fastjsonschema.compile(SCHEMA),
    }
    print("| library | validate one typical response | compile the schema |")
    print("|---|---|---|")
    for (name, run), compile_ in zip(candidates.items(), compile_costs.values(), strict=True):
        n = 20000
        per_call = min(timeit.repeat(run, number=n, repeat=5)) / n * 1e6
        m = 200
        per_compile = min(timeit.repeat(compile_, number=m, repeat=3)) / m * 1e6
        print(f"| {name} | {per_call:.1f} µs | {per_compile:.0f} µs |")


if __name__ == "__main__":
    main()
