"""Policy files: YAML parsing with line numbers, schema problems as file:line: field: what to fix."""

from __future__ import annotations

import copy as copy_module
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

from gateway.fields import dotted
from gateway.policy import Policy, exclusive_problems
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
    if not directory.is_dir():
        return {}, [Problem(directory, None, "", "is not a directory of policy files")]
    files = policy_files(directory)
    if not files:
        return {}, [Problem(directory, None, "", "holds no policy files (*.yaml or *.yml)")]
    return load_files(files, environ, require_secrets=require_secrets)


def policy_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.suffix in {".yaml", ".yml"} and not p.name.startswith(".")
    )


def load_files(
    files: list[Path], environ: Mapping[str, str] | None = None, *, require_secrets: bool = True
) -> tuple[dict[str, Route], list[Problem]]:
    """Every problem of every file, each with its line: a file with problems does not stop the others."""
    env = os.environ if environ is None else environ
    routes: dict[str, Route] = {}
    problems: list[Problem] = []
    for file in files:
        policy, node, file_problems = _load(file)
        problems.extend(file_problems)
        if policy is None:
            continue
        if policy.route in routes:
            first = routes[policy.route].source
            where = _line(node, ("route",))
            problems.append(Problem(file, where, "route", f"{policy.route!r} is already defined in {first}"))
            continue
        preflight = policy.rollout.preflight
        if preflight is not None and preflight.dataset is not None:
            dataset = file.parent / preflight.dataset
            if not dataset.is_file():
                why = f"{dataset}: no such file (the held-out set, relative to the policy file)"
                line = _line(node, ("rollout", "preflight", "dataset"))
                problems.append(Problem(file, line, "rollout.preflight.dataset", why))
                continue
        route, missing = compile_policy(policy, file, env)
        severity: Severity = "error" if require_secrets else "warning"
        problems.extend(
            Problem(file, _line(node, _parts(path)), path, msg, severity) for path, msg in missing
        )
        routes[policy.route] = route
    return routes, problems


def load_file(file: Path) -> tuple[Policy | None, list[Problem]]:
    policy, _, problems = _load(file)
    return policy, problems


def _load(file: Path) -> tuple[Policy | None, yaml.Node | None, list[Problem]]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, None, [Problem(file, None, "", f"cannot be read: {exc}")]
    try:
        node, data = _parse(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        return None, None, [Problem(file, line, "", f"is not valid YAML: {exc.problem}")]
    except _DuplicateKey as exc:
        return None, None, [Problem(file, exc.line, exc.path, "is defined twice in the same mapping")]
    except _TooLarge as exc:
        message = f"too many aliases: the file expands past {MAX_NODES} YAML nodes (an alias bomb?)"
        return None, None, [Problem(file, exc.line, "", message)]
    if not isinstance(data, dict):
        return None, node, [Problem(file, 1, "", "must be a mapping with at least `route` and `arms.base`")]
    try:
        return Policy.model_validate(data), node, []
    except ValidationError as exc:
        errors = _every_error(data, exc)
    problems = [_problem(file, node, err) for err in errors]
    for written, said in exclusive_problems(data):
        loc, message = _at_named_field(node, (), said)  # told as the section's own check tells it
        if not loc:
            loc, message = written, said
        if not any((p.path, p.message) == (dotted(loc), message) for p in problems):
            problems.append(Problem(file, _line(node, loc), dotted(loc), message))
    return None, node, sorted(problems, key=lambda p: p.line or 0)


# A check of a whole section (a model validator) runs only once every field in it is valid, and a check of
# the whole policy only once every section is: one pass would tell a problem, and the next pass the one
# behind it. Each further pass leaves out the fields already found wrong, so that the checks behind them
# run; a problem they find about a field left out is not one (it was there, only wrong).
MAX_PASSES = 4


def _every_error(data: dict[str, Any], first: ValidationError) -> list[Any]:
    errors = list(first.errors())
    seen = {(tuple(e["loc"]), e["msg"]) for e in errors}
    left_out: list[tuple[PathPart, ...]] = []
    named: set[str] = set()  # the fields left out, and those an unknown field was likely meant to be
    current, fresh = data, errors  # the data the last pass validated, and what it found
    for _ in range(MAX_PASSES - 1):
        paths = [p for e in fresh if (p := _data_path(current, _subject(e, current))) and p not in left_out]
        if not paths:
            break
        left_out += paths
        named |= {str(p[-1]) for p in paths} | {m for e in fresh if (m := _meant(e)) is not None}
        current = _without(data, left_out)
        try:
            Policy.model_validate(current)
            break
        except ValidationError as exc:
            fresh = [
                e
                for e in exc.errors()
                if (tuple(e["loc"]), e["msg"]) not in seen and not _about(e, left_out, named)
            ]
        if not fresh:
            break
        seen |= {(tuple(e["loc"]), e["msg"]) for e in fresh}
        errors += fresh
    return errors


def _subject(error: Mapping[str, Any], data: Any) -> tuple[PathPart, ...]:
    """Where the error is: its location, or for a check of a whole section that names the field it is
    about first ("rollout.weight is above 0 but ..."), that field when the data has it."""
    loc = tuple(error["loc"])
    named = _NAMED.match(str(error.get("msg", "")).removeprefix("Value error, "))
    if error["type"] != "value_error" or named is None:
        return loc
    field = (*loc, *_parts(named[0]))
    return field if _data_path(data, field) == field else loc


_NAMED = re.compile(r"[a-z_]+(?:\.[a-z_]+)+\b")  # a field's dotted path at the start of a message


def _meant(error: Mapping[str, Any]) -> str | None:
    """For an unknown field, the known one it is closest to (what it was likely meant to be)."""
    if error["type"] != "extra_forbidden":
        return None
    loc = tuple(error["loc"])
    model = _model_at(loc[:-1])
    allowed = [field.alias or name for name, field in model.model_fields.items()] if model else []
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    return close[0] if close else None


def _data_path(data: Any, loc: Any) -> tuple[PathPart, ...] | None:
    """The error's location as keys of mappings in the data (a field to leave out: for an item of a list,
    the list's field, since leaving the item out would renumber the items after it); None for the whole
    document."""
    path: list[PathPart] = []
    node = data
    for part in loc:
        if not _holds(node, part):
            break
        path.append(part)
        node = node[part]
    while path and isinstance(path[-1], int):  # an item of a list: the list's field is left out
        path.pop()
    return tuple(path) or None


def _holds(node: Any, part: PathPart) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and part < len(node)


def _without(data: Any, paths: list[tuple[PathPart, ...]]) -> Any:
    copy = copy_module.deepcopy(data)
    for path in paths:
        node = copy
        for part in path[:-1]:
            node = node[part]
        node.pop(path[-1], None)
    return copy


def _about(error: Mapping[str, Any], left_out: list[tuple[PathPart, ...]], named: set[str]) -> bool:
    """A problem at or under a field left out, or one whose message names such a field."""
    loc = tuple(error["loc"])
    if any(loc[: len(path)] == path for path in left_out):
        return True
    message = str(error.get("msg", ""))
    return any(re.search(rf"\b{re.escape(name)}\b", message) for name in named)


def _parts(path: str) -> tuple[PathPart, ...]:
    """`arms.base.api_key_env`, `evaluators[2].name` as the parts of a location."""
    parts: list[PathPart] = []
    for word in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        parts.append(int(word[1:-1]) if word.startswith("[") else word)
    return tuple(parts)


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
                raise _DuplicateKey(dotted(here), key.start_mark.line + 1)
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
        if kind == "value_error":
            loc, message = _at_named_field(root, loc, message)
    line = _line(root, loc, stop_at_parent=kind == "missing")
    return Problem(file, line, dotted(loc), message)


def _at_named_field(
    root: yaml.Node | None, loc: tuple[PathPart, ...], message: str
) -> tuple[tuple[PathPart, ...], str]:
    """A check of a whole section that begins by naming the field it is about ("mirror.percent is above
    0 but ...") is told at that field, with its line."""
    named = _NAMED.match(message)
    if named is None:
        return loc, message
    field = (*loc, *_parts(named[0]))
    if _line(root, field, exact=True) is None:
        return loc, message
    return field, message[named.end() :].lstrip()


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


def _line(
    root: yaml.Node | None, loc: tuple[PathPart, ...], *, stop_at_parent: bool = False, exact: bool = False
) -> int | None:
    """Line of the deepest YAML node on the error's path (for a missing field: its parent mapping); exact:
    None unless the whole path is in the file."""
    if root is None:
        return None
    node = root
    parts = loc[:-1] if stop_at_parent and loc else loc
    for index, part in enumerate(parts):
        if isinstance(node, yaml.MappingNode):
            entry = next(((k, v) for k, v in node.value if k.value == part), None)
            if entry is None:
                return None if exact else int(node.start_mark.line) + 1
            key, value = entry
            node = key if index == len(parts) - 1 else value
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return None if exact else int(node.start_mark.line) + 1
    return int(node.start_mark.line) + 1
