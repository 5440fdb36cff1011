"""Policy files: YAML parsing with line numbers, schema problems as file:line: field: what to fix."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from gateway.policy import Policy
from gateway.route import Route, compile_policy

Severity = Literal["error", "warning"]
PathPart = str | int


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int | None
    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        field = f" {self.path}:" if self.path else ""
        tag = "" if self.severity == "error" else " (warning)"
        return f"{where}:{field} {self.message}{tag}"


class PolicyError(Exception):
    """A policy directory that cannot be served; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def load_dir(
    directory: Path, environ: Mapping[str, str] | None = None, *, require_secrets: bool = True
) -> tuple[dict[str, Route], list[Problem]]:
    """Load and compile every *.yaml / *.yml policy; problems of severity error make the set unusable."""
    env = os.environ if environ is None else environ
    if not directory.is_dir():
        return {}, [Problem(directory, None, "", "is not a directory of policy files")]
    files = sorted(
        p for p in directory.iterdir() if p.suffix in {".yaml", ".yml"} and not p.name.startswith(".")
    )
    if not files:
        return {}, [Problem(directory, None, "", "holds no policy files (*.yaml or *.yml)")]
    routes: dict[str, Route] = {}
    problems: list[Problem] = []
    for file in files:
        policy, file_problems = load_file(file)
        problems.extend(file_problems)
        if policy is None:
            continue
        if policy.route in routes:
            first = routes[policy.route].source
            problems.append(Problem(file, None, "route", f"{policy.route!r} is already defined in {first}"))
            continue
        preflight = policy.rollout.preflight
        if preflight is not None and preflight.dataset is not None:
            dataset = file.parent / preflight.dataset
            if not dataset.is_file():
                why = f"{dataset}: no such file (the held-out set, relative to the policy file)"
                problems.append(Problem(file, None, "rollout.preflight.dataset", why))
                continue
        route, missing = compile_policy(policy, file, env)
        severity: Severity = "error" if require_secrets else "warning"
        problems.extend(Problem(file, None, path, msg, severity) for path, msg in missing)
        routes[policy.route] = route
    return routes, problems


def load_file(file: Path) -> tuple[Policy | None, list[Problem]]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(file, None, "", f"cannot be read: {exc}")]
    try:
        node, data = _parse(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        return None, [Problem(file, line, "", f"is not valid YAML: {exc.problem}")]
    except _DuplicateKey as exc:
        return None, [Problem(file, exc.line, exc.path, "is defined twice in the same mapping")]
    except _TooLarge as exc:
        message = f"too many aliases: the file expands past {MAX_NODES} YAML nodes (an alias bomb?)"
        return None, [Problem(file, exc.line, "", message)]
    if not isinstance(data, dict):
        return None, [Problem(file, 1, "", "must be a mapping with at least `route` and `arms.base`")]
    try:
        return Policy.model_validate(data), []
    except ValidationError as exc:
        problems = [_problem(file, node, err) for err in exc.errors()]
        return None, sorted(problems, key=lambda p: p.line or 0)


class PolicyYAMLLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. Under YAML 1.1 rules (PyYAML's default) `on`, `off`, `yes`
    and `no` are booleans too, which would turn `fallback: {on: [...]}` and `json: off` into nonsense."""


PolicyYAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
PolicyYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class _DuplicateKey(Exception):
    def __init__(self, path: str, line: int) -> None:
        self.path, self.line = path, line


# A policy is a few hundred nodes. Aliases can make a 565-byte file expand to billions (an alias bomb):
# past this many nodes, counted with every alias expanded, the file is refused before anything walks it.
MAX_NODES = 100_000


class _TooLarge(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


def _parse(text: str) -> tuple[yaml.Node | None, Any]:
    loader = PolicyYAMLLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_duplicates(node, (), [MAX_NODES])
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicates(node: yaml.Node, path: tuple[PathPart, ...], budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge(node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key, value in node.value:
            here = (*path, key.value)
            if key.value in seen:
                raise _DuplicateKey(_dotted(here), key.start_mark.line + 1)
            seen.add(key.value)
            _check_duplicates(value, here, budget)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicates(item, (*path, index), budget)


def _problem(file: Path, root: yaml.Node | None, err: Mapping[str, Any]) -> Problem:
    loc: tuple[PathPart, ...] = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        message = _unknown_field(loc)
    elif kind == "missing":
        message = f"is required but missing ({_field_hint(loc)})"
    else:
        message = str(err["msg"]).removeprefix("Value error, ")
        value = err.get("input")
        if isinstance(value, str | int | float | bool) and kind != "value_error":
            message += f" (got {value!r})"
    line = _line(root, loc, stop_at_parent=kind == "missing")
    return Problem(file, line, _dotted(loc), message)


def _unknown_field(loc: tuple[PathPart, ...]) -> str:
    model = _model_at(loc[:-1])
    allowed = sorted(field.alias or name for name, field in model.model_fields.items()) if model else []
    message = "is not a known field"
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    if allowed:
        message += f" Allowed here: {', '.join(allowed)}"
    return message


def _field_hint(loc: tuple[PathPart, ...]) -> str:
    field = _field(_model_at(loc[:-1]), str(loc[-1]))
    if field is not None and field.description:
        return field.description
    return "add it"


def _model_at(loc: tuple[PathPart, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Policy
    for part in loc:
        if model is None or isinstance(part, int):
            return None
        field = _field(model, part)
        model = _unwrap_model(field.annotation) if field else None
    return model


def _field(model: type[BaseModel] | None, name: str) -> FieldInfo | None:
    """A model's field by its name in the file (its alias, where it has one)."""
    if model is None:
        return None
    return next((f for n, f in model.model_fields.items() if (f.alias or n) == name), None)


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _line(root: yaml.Node | None, loc: tuple[PathPart, ...], *, stop_at_parent: bool) -> int | None:
    """Line of the deepest YAML node on the error's path (for a missing field: its parent mapping)."""
    if root is None:
        return None
    node = root
    parts = loc[:-1] if stop_at_parent and loc else loc
    for index, part in enumerate(parts):
        if isinstance(node, yaml.MappingNode):
            entry = next(((k, v) for k, v in node.value if k.value == part), None)
            if entry is None:
                break
            key, value = entry
            node = key if index == len(parts) - 1 else value
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return int(node.start_mark.line) + 1


def _dotted(loc: tuple[PathPart, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
