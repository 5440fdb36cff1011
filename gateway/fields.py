"""A client's request fields in the wrong shape, told as OpenAI does: the field in `param`, the type
expected and the type sent in the message. For the gateway's own endpoints (feedback, the admin API),
pydantic's errors read the same way."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from gateway.errors import InvalidRequest
from gateway.validation import describe

# pydantic's error types, as the type they expected
EXPECTED = {
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "dict_type": "an object",
    "list_type": "an array",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def wrong_type(field: str, expected: str, value: object, hint: str = "") -> InvalidRequest:
    """400 for a field of the wrong type: `'model' must be a string (...), not a number`."""
    more = f" ({hint})" if hint else ""
    return InvalidRequest(f"'{field}' must be {expected}{more}, not {describe(value)}", param=field)


def invalid_fields(errors: Sequence[Mapping[str, Any]], model: type[BaseModel] | None) -> InvalidRequest:
    """One 400 for pydantic's errors of a request body (the first field in error): `param` names it, the
    message says what the field takes (its description where it has one) and what was sent."""
    if not errors:
        return InvalidRequest("the request body is not valid")
    first = errors[0]
    error = str(first.get("type", ""))
    if error == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return InvalidRequest(f"the request body is not valid JSON: {why}", code="invalid_json")
    param = _param(first["loc"])
    if param is None:  # the body as a whole
        if error in EXPECTED:
            return InvalidRequest(
                f"the request body must be a JSON object, not {describe(first.get('input'))}"
            )
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return InvalidRequest(message, param=(first.get("ctx") or {}).get("param"))
    field = param.split(".")[0].split("[")[0]
    described = _description(model, field)
    same = [e for e in errors if _param(e["loc"]) == param]
    value = first.get("input")
    if error == "missing":
        return InvalidRequest(f"'{param}' is required" + (f": {described}" if described else ""), param=param)
    if error == "extra_forbidden":
        known = ", ".join(sorted(model.model_fields)) if model is not None else ""
        return InvalidRequest(
            f"'{param}' is not a field of this request" + (f"; its fields are {known}" if known else ""),
            param=param,
        )
    if len(same) > 1 and described:  # a union: none of its forms took the value
        return InvalidRequest(f"'{param}' must be {described}; got {_shown(value)}", param=param)
    if error in EXPECTED:
        return wrong_type(param, EXPECTED[error], value, described or "")
    message = str(first.get("msg", "is not valid")).removeprefix("Value error, ")
    return InvalidRequest(f"'{param}': {message}; got {_shown(value)}", param=param)


def _param(loc: Sequence[str | int]) -> str | None:
    """The field's path in the body (`gates[2].gate`), without pydantic's union tags; None for the body."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    named = next((i for i, p in enumerate(parts) if isinstance(p, str) and not _FIELD.match(p)), len(parts))
    return dotted(parts[:named]) or None  # literal['up','down'], function-after[...]: a union member


def dotted(loc: Sequence[str | int]) -> str:
    """A location as a field path: `evaluators[2].name`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _description(model: type[BaseModel] | None, field: str) -> str | None:
    info = model.model_fields.get(field) if model is not None else None
    return info.description if info is not None else None


def _shown(value: object) -> str:
    if isinstance(value, str | int | float | bool) or value is None:
        return repr(value)[:80]
    return describe(value)
