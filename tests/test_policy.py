from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gateway.loader import PolicyYAMLLoader, load_dir, load_file
from gateway.route import Route

REPO_POLICIES = Path(__file__).resolve().parent.parent / "policies"

VALID = """\
route: chat
arms:
  base: {url: http://base:8000/v1/, model: m}
  candidate: {url: https://tuned:8000/v1, model: t, timeouts: {first_token_s: 3}}
timeouts: {connect_s: 1, first_token_s: 10, total_s: 60}
rollout: {weight: 12.5}
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def only_route(directory: Path, environ: dict[str, str] | None = None) -> Route:
    routes, problems = load_dir(directory, environ or {})
    assert problems == []
    (route,) = routes.values()
    return route


def test_every_example_policy_loads_cleanly() -> None:
    routes, problems = load_dir(REPO_POLICIES, {})
    assert [p for p in problems if p.severity == "error"] == []
    assert {"support-assistant", "extractor", "embed"} <= routes.keys()


def test_valid_policy_compiles(tmp_path: Path) -> None:
    write(tmp_path, "chat.yaml", VALID)
    route = only_route(tmp_path)
    assert route.base.url == "http://base:8000/v1"  # trailing slash removed
    assert str(route.base.urls["chat"]) == "http://base:8000/v1/chat/completions"
    assert route.weight == 12.5
    assert route.candidate is not None
    assert route.candidate.timeouts.first_token_s == 3  # arm override
    assert route.candidate.timeouts.total_s == 60  # inherited from the route
    assert route.base.timeouts.first_token_s == 10


def test_problems_name_file_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", VALID.replace("rollout: {weight: 12.5}", "rollout: {weight: 150}"))
    _, problems = load_file(path)
    (problem,) = problems
    assert (problem.file, problem.line, problem.path) == (path, 6, "rollout.weight")
    assert "less than or equal to 100" in problem.message and "150" in problem.message
    assert str(problem).startswith(f"{path}:6: rollout.weight:")


def test_unknown_field_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", VALID.replace("  candidate:", "  canddate:"))
    _, problems = load_file(path)
    (problem,) = problems
    assert problem.path == "arms.canddate" and problem.line == 4
    assert "did you mean 'candidate'" in problem.message


def test_missing_field_points_at_its_parent(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "route: r\narms:\n  base:\n    url: http://x/v1\n")
    _, problems = load_file(path)
    (problem,) = problems
    assert problem.path == "arms.base.model" and problem.line == 3
    assert "required" in problem.message


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        (VALID.replace("http://base:8000/v1/", "ftp://base/v1"), "arms.base.url", "http:// or https://"),
        (VALID.replace("http://base:8000/v1/", "http://u:p@base/v1"), "arms.base.url", "credentials"),
        (VALID.replace("connect_s: 1", "connect_s: 100"), "timeouts", "cannot exceed total_s"),
        (VALID.replace("first_token_s: 3", "first_token_s: 90"), "arms.candidate.timeouts", "merged with"),
        (VALID.replace("route: chat", "route: 'two words'"), "route", "not a route name"),
        (VALID + "assignment: {sticky_keys: [cookie:x]}\n", "assignment.sticky_keys", "header:NAME"),
        (
            VALID.replace("model: m}", "model: m, headers: {Authorization: x}}"),
            "arms.base.headers",
            "api_key_env",
        ),
        (
            VALID.replace("model: m}", "model: m, api_key_env: K, forward_client_auth: true}"),
            "arms.base",
            "not both",
        ),
        (
            VALID.replace("model: t,", "model: t, api_key_env: 'no-dash',"),
            "arms.candidate.api_key_env",
            "variable",
        ),
        (
            VALID.replace("model: m}", "model: m, tls: {verify: false}}"),
            "arms.base",
            "tls applies to an https:// url only",
        ),
        (
            VALID.replace("http://base:8000/v1/", "https://base/v1").replace(
                "model: m}", "model: m, tls: {ca_file: /nonexistent/ca.pem}}"
            ),
            "arms.base.tls",
            "ca_file: cannot read /nonexistent/ca.pem",
        ),
        (VALID.replace("model: m}", "model: m, max_connections: 0}"), "arms.base.max_connections", "1"),
    ],
)
def test_field_checks(tmp_path: Path, text: str, path: str, fragment: str) -> None:
    _, problems = load_file(write(tmp_path, "p.yaml", text))
    assert len(problems) == 1, problems
    assert problems[0].path == path
    assert fragment in problems[0].message


def test_weight_without_candidate_is_rejected(tmp_path: Path) -> None:
    text = "route: r\narms:\n  base: {url: http://b/v1, model: m}\nrollout: {weight: 5}\n"
    _, problems = load_file(write(tmp_path, "p.yaml", text))
    assert "arms.candidate is not defined" in problems[0].message


def test_duplicate_keys_and_bad_yaml(tmp_path: Path) -> None:
    _, dup = load_file(write(tmp_path, "a.yaml", VALID + "rollout: {weight: 1}\n"))
    assert dup[0].path == "rollout" and dup[0].line == 7 and "twice" in dup[0].message
    _, broken = load_file(write(tmp_path, "b.yaml", "route: r\narms: [1, 2\n"))
    assert broken[0].line == 3 and "not valid YAML" in broken[0].message
    _, scalar = load_file(write(tmp_path, "c.yaml", "just a string\n"))
    assert "must be a mapping" in scalar[0].message


def test_directory_level_problems(tmp_path: Path) -> None:
    assert "no policy files" in load_dir(tmp_path, {})[1][0].message
    write(tmp_path, "a.yaml", VALID)
    write(tmp_path, "b.yml", VALID)
    routes, problems = load_dir(tmp_path, {})
    assert list(routes) == ["chat"]
    assert problems[0].file.name == "b.yml" and "already defined in" in problems[0].message


def test_missing_secret_is_an_error_for_serve_and_a_warning_for_check(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", VALID.replace("model: m}", "model: m, api_key_env: BASE_KEY}"))
    _, problems = load_dir(tmp_path, {})
    assert [(p.severity, p.path) for p in problems] == [("error", "arms.base.api_key_env")]
    _, relaxed = load_dir(tmp_path, {}, require_secrets=False)
    assert relaxed[0].severity == "warning"
    route = only_route(tmp_path, {"BASE_KEY": "sk-secret"})
    assert route.base.headers["Authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(route.policy)  # the policy never holds the secret itself


def test_yaml_1_2_booleans_keep_on_and_off_as_words(tmp_path: Path) -> None:
    text = VALID + "validation: {json: off, tool_calls: false}\nfallback: {on: [timeout, http_5xx]}\n"
    policy, problems = load_file(write(tmp_path, "p.yaml", text))
    assert problems == []
    assert policy is not None
    assert policy.validation.json_ == "off" and policy.validation.tool_calls is False
    assert policy.fallback.on == ["timeout", "http_5xx"]


def test_validation_and_fallback_checks(tmp_path: Path) -> None:
    cases = {
        "validation: {schema: {type: nope}}": ("validation.schema", "not a valid JSON Schema"),
        "validation: {json: off, schema: {type: object}}": ("validation", "schema is set but json is off"),
        "fallback: {on: [timeout, oops]}": ("fallback.on[1]", "Input should be"),
        "fallback: {on: [timeout, timeout]}": ("fallback.on", "listed twice"),
        "fallback: {circuit_breaker: {window: 5, min_requests: 10}}": (
            "fallback.circuit_breaker",
            "cannot exceed",
        ),
        "fallback: {budget: {ratio: 2}}": ("fallback.budget.ratio", "less than or equal to 1"),
        "validation: {strem: buffer}": ("validation.strem", "did you mean 'stream'"),
    }
    for extra, (path, fragment) in cases.items():
        _, problems = load_file(write(tmp_path, "p.yaml", VALID + extra + "\n"))
        assert [p.path for p in problems] == [path], (extra, problems)
        assert fragment in problems[0].message, (extra, problems[0].message)
        assert problems[0].line == 7


def test_deadline_defaults_to_the_sum_of_the_attempts(tmp_path: Path) -> None:
    write(tmp_path, "chat.yaml", VALID)
    assert only_route(tmp_path).deadline_s == 120  # candidate 60 + base 60
    write(tmp_path, "chat.yaml", VALID.replace("total_s: 60}", "total_s: 60, deadline_s: 90}"))
    assert only_route(tmp_path).deadline_s == 90


def test_every_policy_example_in_the_readme_loads(tmp_path: Path) -> None:
    readme = (REPO_POLICIES.parent / "README.md").read_text()
    examples = [  # chart values (a `policies:` key) are rendered by test_deploy instead
        e for e in re.findall(r"```yaml\n(.*?)```", readme, re.S) if not re.search(r"^policies:", e, re.M)
    ]
    assert len(examples) >= 2
    for index, example in enumerate(examples):
        write(tmp_path, f"example-{index}.yaml", example)
        for dataset in re.findall(r"^\s+dataset: (\S+)", example, re.M):  # the held-out sets they name
            (tmp_path / dataset).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / dataset).write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    routes, problems = load_dir(tmp_path, {"BASE_KEY": "sk-test", "JUDGE_KEY": "sk-judge"})
    assert problems == []
    assert len(routes) == len(examples)


def test_every_problem_of_a_file_in_one_pass(tmp_path: Path) -> None:
    """Checks of a section or of the whole policy wait for valid fields in pydantic; the loader still
    tells them in the same pass (steps and weight both set beside a steps error; a route-level check
    beside a wrong timeout), each with its line."""
    path = write(
        tmp_path,
        "p.yaml",
        "route: r\n"
        "arms:\n"
        "  base: {url: http://b/v1, model: m}\n"
        "timeouts: {connect_s: soon}\n"
        "mirror: {percent: 5}\n"
        "rollout:\n"
        "  weight: 10\n"
        "  steps: [5, 1]\n",
    )
    _, problems = load_file(path)
    said = {(p.line, p.path, p.message.split(" (got")[0]) for p in problems}
    assert said == {
        (4, "timeouts.connect_s", "Input should be a valid number, unable to parse string as a number"),
        (5, "mirror.percent", "is above 0 but arms.candidate is not defined"),
        (7, "rollout.weight", "is above 0 but arms.candidate is not defined"),
        (8, "rollout.steps", "must increase step by step, got [5.0, 1.0]"),
        (8, "rollout.steps", "set either weight (manual mode) or steps (automatic mode), not both"),
        (8, "rollout.steps", "needs arms.candidate"),
    }, problems


@pytest.mark.parametrize(
    ("change", "only"),
    [
        (("  candidate:", "  canddate:"), "arms.canddate"),  # not also "weight above 0 without candidate"
        (("rollout: {weight: 12.5}", "rollout: {weight: lots}"), "rollout.weight"),
        (("rollout: {weight: 12.5}", "rollout: {steps: [0]}"), "rollout.steps[0]"),
    ],
)
def test_a_wrong_field_is_told_once_and_not_again_as_missing(
    tmp_path: Path, change: tuple[str, str], only: str
) -> None:
    """A field left out for the next pass is not then told missing, nor as what its absence implies."""
    path = write(tmp_path, "p.yaml", VALID.replace(*change))
    _, problems = load_file(path)
    assert [p.path for p in problems] == [only], problems


def test_directory_problems_have_lines(tmp_path: Path) -> None:
    (tmp_path / "held.jsonl").write_text("")
    write(tmp_path, "a.yaml", VALID)
    write(tmp_path, "b.yaml", "# the same route again\n" + VALID)
    write(
        tmp_path,
        "c.yaml",
        VALID.replace("route: chat", "route: other").replace(
            "rollout: {weight: 12.5}", "rollout:\n  steps: [50, 100]\n  preflight: {dataset: gone.jsonl}"
        ),
    )
    _, problems = load_dir(tmp_path, {})
    lines = {(p.file.name, p.path): p.line for p in problems}
    assert lines == {("b.yaml", "route"): 2, ("c.yaml", "rollout.preflight.dataset"): 8}, problems


def _leaves(node: object, path: tuple[object, ...] = ()) -> list[tuple[tuple[object, ...], object]]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _leaves(value, (*path, key))]
    if isinstance(node, list):
        return [leaf for index, value in enumerate(node) for leaf in _leaves(value, (*path, index))]
    return [(path, node)]


def test_one_wrong_value_is_one_problem_in_every_example_policy(tmp_path: Path) -> None:
    """Every number and boolean of every example policy (policies/ and the README's), made a word in turn:
    each time, the problems found are about that field only. Leaving wrong fields out to run the checks
    behind them must never invent a problem elsewhere."""
    import yaml

    readme = (REPO_POLICIES.parent / "README.md").read_text()
    texts = [p.read_text() for p in sorted(REPO_POLICIES.glob("*.yaml"))]
    texts += [
        e for e in re.findall(r"```yaml\n(.*?)```", readme, re.S) if not re.search(r"^policies:", e, re.M)
    ]
    tried = 0
    for text in texts:
        data = yaml.load(text, Loader=PolicyYAMLLoader)  # a safe loader, with YAML 1.2 booleans
        for path, value in _leaves(data):
            if not isinstance(value, int | float) or "dataset" in path:
                continue
            broken = json.loads(json.dumps(data))
            node = broken
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = "oops"
            file = tmp_path / "p.yaml"
            file.write_text(yaml.safe_dump(broken))
            _, problems = load_file(file)
            dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
            assert problems, dotted
            assert all(dotted.startswith(p.path) or p.path.startswith(dotted) for p in problems), (
                dotted,
                [str(p) for p in problems],
            )
            tried += 1
    assert tried > 100
