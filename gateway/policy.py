"""Route policies: the serialisable schema (pydantic, extra="forbid") checked completely at load."""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from itertools import pairwise
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.apis import DEFAULT_APIS, Api
from gateway.errors import REASONS, Reason
from gateway.tls import client_context
from gateway.validation import SchemaError, compile_schema

ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_BODY_PATH = r"body:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,3}"
STICKY_SOURCE = re.compile(rf"^(header:[A-Za-z0-9!#$%&'*+.^_`|~-]+|{_BODY_PATH}|api_key)$")
# Where a request's trace (an agent run, a conversation) is named: the W3C traceparent's trace id too.
TRACE_SOURCE = re.compile(rf"^(header:[A-Za-z0-9!#$%&'*+.^_`|~-]+|{_BODY_PATH}|traceparent)$")
# Headers the gateway owns on the upstream hop; a policy cannot set them.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "authorization",
        "accept-encoding",
        "te",
        "upgrade",
        "keep-alive",
        "proxy-authorization",
        "x-request-id",
    }
)
DEFAULT_STICKY_KEYS = ("header:x-session-id", "header:x-user-id", "body:user")
DEFAULT_TRACE_KEYS = ("header:x-conversation-id", "body:metadata.conversation_id")

Seconds = Annotated[float, Field(gt=0, le=3600)]
ArmName = Literal["base", "candidate"]
ARM_NAMES: tuple[ArmName, ...] = ("base", "candidate")
Mode = Literal["primary", "mirror"]
MODE_NAMES: tuple[Mode, ...] = ("primary", "mirror")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(Strict):
    """connect_s: TCP connect; first_token_s: until the first streamed chunk; total_s: one upstream
    exchange; deadline_s: the whole request, the candidate attempt and its fallback together."""

    connect_s: Seconds = 2.0
    first_token_s: Seconds = 30.0
    total_s: Seconds = 300.0
    deadline_s: Seconds | None = Field(
        default=None, description="Defaults to the candidate's total_s plus the base's total_s"
    )

    @model_validator(mode="after")
    def _ordered(self) -> Timeouts:
        problem = timeout_order_problem(self)
        if problem:
            raise ValueError(problem)
        return self


def timeout_order_problem(t: Timeouts) -> str | None:
    if t.deadline_s is not None and t.first_token_s > t.deadline_s:
        return f"first_token_s ({t.first_token_s}) cannot exceed deadline_s ({t.deadline_s})"
    if t.connect_s > t.total_s:
        return f"connect_s ({t.connect_s}) cannot exceed total_s ({t.total_s})"
    if t.first_token_s > t.total_s:
        return f"first_token_s ({t.first_token_s}) cannot exceed total_s ({t.total_s})"
    return None


class TimeoutOverrides(Strict):
    connect_s: Seconds | None = None
    first_token_s: Seconds | None = None
    total_s: Seconds | None = None


class Price(Strict):
    """What an arm's tokens cost, per million, in one currency for the whole route (e.g. USD)."""

    input_per_million: float = Field(ge=0, le=1_000_000)
    output_per_million: float = Field(ge=0, le=1_000_000)


class Tls(Strict):
    """TLS to the arm's server: a private CA, a client certificate for mTLS, or no verification."""

    ca_file: str | None = Field(default=None, description="PEM file of the CAs that sign the server's cert")
    client_cert_file: str | None = Field(default=None, description="PEM client certificate (mTLS)")
    client_key_file: str | None = Field(default=None, description="Its private key, if not in the cert file")
    verify: bool = Field(default=True, description="false: accept any certificate (testing only)")

    @model_validator(mode="after")
    def _loads(self) -> Tls:
        if self.client_key_file is not None and self.client_cert_file is None:
            raise ValueError("client_key_file needs client_cert_file")
        self.context()  # a missing or unreadable file is a load error, not a failure at the first request
        return self

    def context(self) -> ssl.SSLContext:
        return client_context(self.ca_file, self.client_cert_file, self.client_key_file, self.verify)


class Arm(Strict):
    url: str = Field(description="Base URL of the OpenAI-compatible API, e.g. http://vllm:8000/v1")
    model: str = Field(min_length=1, max_length=256, description="Model name the upstream expects")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the key")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent upstream")
    forward_client_auth: bool = Field(
        default=False, description="Pass the client's Authorization header upstream (off by default)"
    )
    timeouts: TimeoutOverrides | None = None
    price: Price | None = Field(
        default=None, description="Token prices: canarygate_cost_total and the cost gate"
    )
    max_connections: int = Field(
        default=256, ge=1, le=100_000, description="This arm's own connection limit (its bulkhead)"
    )
    keepalive_s: float = Field(
        default=4.0, ge=0, le=300, description="How long an idle connection is kept; below the server's"
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Requests the arm's server runs at once (llama.cpp: its slots): shadow calls take only "
        "spare ones, and yield to users",
    )
    max_response_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest non-streamed answer or error body read from the arm",
    )
    tls: Tls | None = Field(default=None, description="TLS settings for an https:// url")
    apis: list[Api] = Field(
        default_factory=lambda: list(DEFAULT_APIS),
        min_length=1,
        description="The APIs its server speaks, forwarded as they are: chat, completions, embeddings, "
        "responses (OpenAI's Responses API), messages (Anthropic's Messages API)",
    )
    api_key_header: Literal["authorization", "x-api-key"] = Field(
        default="authorization",
        description="How api_key_env's key is sent: 'Authorization: Bearer' or x-api-key (Anthropic's API)",
    )

    _url = field_validator("url")(lambda value: check_url(value))
    _env_name = field_validator("api_key_env")(lambda value: check_env_name(value))
    _headers = field_validator("headers")(lambda value: check_headers(value))

    @model_validator(mode="after")
    def _one_credential(self) -> Arm:
        if self.api_key_env and self.forward_client_auth:
            raise ValueError("set either api_key_env or forward_client_auth, not both")
        if self.tls is not None and not self.url.startswith("https://"):
            raise ValueError("tls applies to an https:// url only")
        return self


def check_url(value: str) -> str:
    """An upstream's base URL: http(s), a host, no query, fragment or credentials."""
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"}:
        raise ValueError(f"must start with http:// or https://, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"has no host: {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query string or fragment")
    if parts.username or parts.password:
        raise ValueError("must not embed credentials; use api_key_env")
    try:
        parts.port  # noqa: B018 - raises on an invalid port
    except ValueError:
        raise ValueError(f"has an invalid port: {value!r}") from None
    return value.rstrip("/")


def check_env_name(value: str | None) -> str | None:
    if value is not None and not ENV_NAME.match(value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits, _)")
    return value


def check_headers(value: dict[str, str]) -> dict[str, str]:
    """Extra headers for an upstream: valid names, not the gateway's own, values HTTP/1.1 can carry."""
    for name, header_value in value.items():
        if not HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set by the gateway; use api_key_env for credentials")
        if "\r" in header_value or "\n" in header_value:
            raise ValueError(f"value of header {name!r} contains a line break")
        try:
            header_value.encode("latin-1")  # what HTTP/1.1 can carry; anything else fails every call
        except UnicodeEncodeError:
            raise ValueError(
                f"value of header {name!r} has characters HTTP headers cannot carry (only Latin-1); "
                "percent-encode them"
            ) from None
    return value


class Arms(Strict):
    base: Arm
    candidate: Arm | None = None


class Assignment(Strict):
    sticky_keys: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STICKY_KEYS),
        description="Sources of the unit key, first present wins: header:NAME, body:FIELD, api_key",
    )
    trace_keys: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TRACE_KEYS),
        description="Sources of the trace key (an agent run, a conversation), first present wins: "
        "header:NAME, body:FIELD.PATH, traceparent (the W3C trace id); [] turns traces off",
    )
    sticky_by: Literal["trace", "unit"] = Field(
        default="trace",
        description="trace: a request with a trace key is assigned by it, so every step of a run is "
        "served by one arm; unit: always by sticky_keys (the trace key only groups the statistics)",
    )
    salt: str | None = Field(default=None, min_length=1, description="Defaults to the candidate's model")
    allow_override_header: bool = Field(default=False, description="Honour x-canary: base|candidate")

    @field_validator("sticky_keys")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        return _key_sources(value, STICKY_SOURCE, "header:NAME, body:FIELD or api_key")

    @field_validator("trace_keys")
    @classmethod
    def _trace_sources(cls, value: list[str]) -> list[str]:
        return _key_sources(value, TRACE_SOURCE, "header:NAME, body:FIELD.PATH or traceparent")


def _key_sources(value: list[str], pattern: re.Pattern[str], kinds: str) -> list[str]:
    for source in value:
        if not pattern.match(source):
            raise ValueError(f"{source!r} is not a key source; use {kinds}")
    duplicates = {s for s in value if value.count(s) > 1}
    if duplicates:
        raise ValueError(f"listed twice: {', '.join(sorted(duplicates))}")
    return [s.lower() if s.startswith("header:") else s for s in value]


class Traces(Strict):
    """Per-trace aggregation: a trace (the requests sharing a trace key) ends when no step has come for
    idle_timeout_s; its steps, tokens, cost and failures are then counted (metrics, trace gates)."""

    idle_timeout_s: float = Field(
        default=300, ge=1, le=86400, description="A trace with no new step for this long has ended"
    )


class Validation(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    json_: Literal["auto", "always", "off"] = Field(
        default="auto",
        alias="json",
        description="auto: when response_format asks for JSON; always: every answer; off",
    )
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="A JSON Schema every answer's content must match"
    )
    tool_calls: bool = Field(default=True, description="Check tool names, arguments and tool_choice")
    stream: Literal["buffer", "passthrough"] = Field(
        default="buffer",
        description="buffer: validate a stream before releasing it; passthrough: record only",
    )
    enforce_on_base: bool = Field(
        default=False, description="Answer 502 invalid_output for invalid base output"
    )
    max_buffer_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)

    @field_validator("schema_")
    @classmethod
    def _compiles(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                compile_schema(value, "the schema")
            except SchemaError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Validation:
        if self.schema_ is not None and self.json_ == "off":
            raise ValueError("schema is set but json is off; remove one of them")
        return self


class Budget(Strict):
    ratio: float = Field(default=0.2, gt=0, le=1, description="Fallbacks per request of the route, at most")
    window_s: float = Field(default=10, gt=0, le=3600)
    min_per_window: int = Field(default=5, ge=0, le=1_000_000)


class CircuitBreaker(Strict):
    enabled: bool = True
    window: int = Field(default=100, ge=1, le=100_000)
    min_requests: int = Field(default=20, ge=1, le=100_000)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    open_s: float = Field(default=30, gt=0, le=86_400)
    half_open_requests: int = Field(default=5, ge=1, le=10_000)

    @model_validator(mode="after")
    def _window(self) -> CircuitBreaker:
        if self.min_requests > self.window:
            raise ValueError(f"min_requests ({self.min_requests}) cannot exceed window ({self.window})")
        return self


class Fallback(Strict):
    on: list[Reason] = Field(
        default_factory=lambda: list(REASONS),
        description="Candidate failures answered by base instead",
    )
    budget: Budget = Field(default_factory=Budget)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)

    @field_validator("on")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        duplicates = {r for r in value if value.count(r) > 1}
        if duplicates:
            raise ValueError(f"listed twice: {', '.join(sorted(duplicates))}")
        return value


class Mirror(Strict):
    percent: float = Field(default=0, ge=0, le=100, description="Percent of base-served traffic shadowed")
    sample_by: Literal["unit", "request"] = Field(
        default="unit", description="unit: the same units are shadowed every time; request: a fresh draw"
    )
    max_concurrency: int = Field(default=16, ge=1, le=10_000)
    max_queue: int = Field(default=256, ge=0, le=1_000_000)
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Shadow calls stop while they used this many tokens in the last minute",
    )
    noise_floor_percent: float = Field(
        default=0, ge=0, le=100, description="Percent of base-served traffic replayed to base, for comparison"
    )
    capture_content: bool = Field(
        default=False,
        description="Keep the prompt and both answers in pair records (privacy: off by default)",
    )
    records: int = Field(default=1000, ge=0, le=1_000_000, description="Pair records kept per route")


EVALUATOR_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
METADATA_SOURCE = re.compile(r"^metadata:[A-Za-z_][A-Za-z0-9_]*$")
RUBRICS = ("instruction_adherence", "task_completion")  # built in; any other text is a custom rubric
JUDGED = frozenset({"rubric", "pairwise"})  # the kinds that ask the judge
EvaluatorKind = Literal[
    "rubric", "pairwise", "tool_selection", "regex", "contains", "max_length", "json_path"
]


class JudgeTimeouts(Strict):
    connect_s: Seconds = 2.0
    total_s: Seconds = 60.0

    @model_validator(mode="after")
    def _ordered(self) -> JudgeTimeouts:
        if self.connect_s > self.total_s:
            raise ValueError(f"connect_s ({self.connect_s}) cannot exceed total_s ({self.total_s})")
        return self


class Judge(Strict):
    """The judge: any OpenAI-compatible chat endpoint (vLLM, llama.cpp, a hosted API, or this gateway's own
    URL and a route of it as the model). Never on a user's path: its calls run in the background, within
    these bounds, behind their own circuit breaker."""

    url: str = Field(description="Base URL of the OpenAI-compatible API, e.g. http://judge:8000/v1")
    model: str = Field(min_length=1, max_length=256)
    api_key_env: str | None = Field(default=None, description="Environment variable holding the key")
    headers: dict[str, str] = Field(default_factory=dict)
    tls: Tls | None = None
    price: Price | None = Field(default=None, description="Token prices: canarygate_judge_cost_total")
    timeouts: JudgeTimeouts = Field(default_factory=JudgeTimeouts)
    max_concurrency: int = Field(default=4, ge=1, le=1000, description="Judge calls at once")
    max_queue: int = Field(default=256, ge=0, le=100_000, description="Judge calls waiting; beyond: dropped")
    requests_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    tokens_per_minute: int | None = Field(default=None, ge=1, description="Judging stops while spent")
    max_tokens: int = Field(default=256, ge=16, le=8192, description="Longest verdict the judge may write")
    response_format: Literal["json_schema", "json_object", "none"] = Field(
        default="json_schema",
        description="How the verdict's schema is asked for: json_schema (OpenAI, vLLM, llama.cpp), "
        "json_object with the schema beside it (llama-cpp-python), none (the prompt alone)",
    )
    max_answer_chars: int = Field(
        default=8000, ge=100, le=1_000_000, description="Each answer and request is cut to this in the prompt"
    )
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)

    _url = field_validator("url")(lambda value: check_url(value))
    _env_name = field_validator("api_key_env")(lambda value: check_env_name(value))
    _headers = field_validator("headers")(lambda value: check_headers(value))

    @model_validator(mode="after")
    def _tls(self) -> Judge:
        if self.tls is not None and not self.url.startswith("https://"):
            raise ValueError("tls applies to an https:// url only")
        return self


class Evaluator(Strict):
    """One evaluation of answers: by the judge (rubric, pairwise) or by a deterministic check. sample: the
    share of requests evaluated, drawn by request id, so every evaluator sees the same requests."""

    name: str = Field(description="Lower-case letters, digits and _: the metrics' evaluator label")
    kind: EvaluatorKind
    sample: float = Field(default=1.0, gt=0, le=1, description="Share of requests evaluated")
    arms: list[ArmName] = Field(default_factory=lambda: list(ARM_NAMES), min_length=1)
    modes: list[Mode] = Field(
        default_factory=lambda: list(MODE_NAMES),
        min_length=1,
        description="primary: answers users got; mirror: the candidate's shadow answers",
    )
    rubric: str | None = Field(
        default=None,
        max_length=4000,
        description="rubric: instruction_adherence, task_completion, or the rubric's own text",
    )
    pattern: str | None = Field(default=None, max_length=1000, description="regex: searched in the answer")
    text: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        default=None, max_length=100, description="contains: any of these"
    )
    case_sensitive: bool = False
    expect: bool = Field(
        default=True, description="regex, contains, json_path: must (true) or must not match"
    )
    max_chars: int | None = Field(default=None, ge=1, description="max_length: characters of the answer")
    max_tokens: int | None = Field(default=None, ge=1, description="max_length: output tokens (usage)")
    path: str | None = Field(default=None, max_length=500, description="json_path: RFC 9535, e.g. $.answer")
    equals: Any = Field(default=None, description="json_path: the value the path must hold")
    expected_from: str | None = Field(
        default=None,
        description="tool_selection: metadata:FIELD of the request naming the right tool; without it, "
        "the candidate's shadow answer is scored against the base's",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not EVALUATOR_NAME.match(value):
            raise ValueError(
                f"{value!r} is not an evaluator name: a-z first, then a-z, 0-9 and _ (48 at most)"
            )
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> Evaluator:
        needed = {
            "rubric": ("rubric",),
            "regex": ("pattern",),
            "contains": ("text",),
            "json_path": ("path",),
        }.get(self.kind, ())
        for name in needed:
            if getattr(self, name) is None:
                raise ValueError(f"kind {self.kind} needs {name}")
        allowed_by_kind: dict[str, set[str]] = {
            "rubric": {"rubric"},
            "pairwise": {"rubric"},
            "tool_selection": {"expected_from"},
            "regex": {"pattern", "expect", "case_sensitive"},
            "contains": {"text", "expect", "case_sensitive"},
            "max_length": {"max_chars", "max_tokens"},
            "json_path": {"path", "equals", "expect"},
        }
        allowed = allowed_by_kind[self.kind]
        specific = set().union(*allowed_by_kind.values())
        stray = sorted((self.model_fields_set & specific) - allowed)
        if stray:
            raise ValueError(f"kind {self.kind} does not take {', '.join(stray)}")
        if self.kind == "max_length" and self.max_chars is None and self.max_tokens is None:
            raise ValueError("kind max_length needs max_chars or max_tokens")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern does not compile: {exc}") from None
        if self.path is not None:
            from gateway.evaluation.checks import compile_path  # the JSONPath library, loaded when used

            problem = compile_path(self.path)[1]
            if problem:
                raise ValueError(f"path: {problem}")
        if self.expected_from is not None and not METADATA_SOURCE.match(self.expected_from):
            raise ValueError(f"expected_from {self.expected_from!r}: use metadata:FIELD")
        if self.kind == "pairwise" and ("arms" in self.model_fields_set or "modes" in self.model_fields_set):
            raise ValueError(
                "kind pairwise judges shadow pairs (base answer vs candidate's): drop arms and modes"
            )
        return self

    @property
    def on_pairs(self) -> bool:
        """Judged on shadow pairs (the candidate's answer against the base's), not on single answers."""
        return self.kind == "pairwise" or (self.kind == "tool_selection" and self.expected_from is None)


class Evaluation(Strict):
    """Evaluators of the route's answers, and the judge the rubric and pairwise ones ask."""

    judge: Judge | None = None
    evaluators: list[Evaluator] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _consistent(self) -> Evaluation:
        names = [e.name for e in self.evaluators]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"evaluator names listed twice: {', '.join(twice)}")
        judged = [e.name for e in self.evaluators if e.kind in JUDGED]
        if judged and self.judge is None:
            raise ValueError(f"evaluators {', '.join(judged)} ask a judge: set evaluation.judge (url, model)")
        return self


COHORT_SOURCE = re.compile(
    r"^(header:[A-Za-z0-9!#$%&'*+.^_`|~-]+|metadata:[A-Za-z_][A-Za-z0-9_]*|api_key_group|tools|json_mode|stream)$"
)
COHORT_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
FLAG_SOURCES = ("tools", "json_mode", "stream")  # their cohorts are "true" and "false"


class Cohorts(Strict):
    """Requests grouped by one attribute, into a bounded set of values (anything else is "other")."""

    source: str = Field(
        description="header:NAME, metadata:FIELD (of the body), api_key_group, tools, json_mode, stream"
    )
    values: list[str] = Field(
        default_factory=list, max_length=50, description="The cohorts; other values count as 'other'"
    )

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if not COHORT_SOURCE.match(value):
            raise ValueError(
                f"{value!r} is not a cohort source; use header:NAME, metadata:FIELD, api_key_group, "
                "tools, json_mode or stream"
            )
        return value.lower() if value.startswith("header:") else value

    @field_validator("values")
    @classmethod
    def _values(cls, value: list[str]) -> list[str]:
        for item in value:
            if not COHORT_VALUE.match(item) or item in ("other", "all"):
                raise ValueError(
                    f"{item!r} cannot be a cohort: 1-64 letters, digits and . _ : -, not 'other' or 'all'"
                )
        if len(set(value)) != len(value):
            raise ValueError("a cohort is listed twice")
        return value

    @model_validator(mode="after")
    def _values_needed(self) -> Cohorts:
        if self.source in FLAG_SOURCES:
            if self.values:
                raise ValueError(f"{self.source} cohorts are always 'true' and 'false': drop values")
        elif not self.values:
            raise ValueError("list the cohorts in values, e.g. [acme, globex]")
        return self

    def names(self) -> list[str]:
        return ["true", "false"] if self.source in FLAG_SOURCES else [*self.values, "other"]


class Targeting(Strict):
    """Which cohorts the candidate may serve: the others always get the base (and no shadow calls)."""

    include: list[str] | None = Field(default=None, description="Only these cohorts see the candidate")
    exclude: list[str] = Field(default_factory=list, description="These cohorts never see the candidate")


class Segments(Strict):
    """Gates judged for each cohort on its own too, so a regression in one cannot hide in the average."""

    by: Literal["cohort"] = "cohort"
    min_share: float = Field(
        default=0.1, gt=0, le=1, description="Cohorts below this share of traffic are not judged alone"
    )


class RateGate(Strict):
    """The candidate's rate may exceed the base's by at most max_increase (a fraction: 0.002 = 0.2 points)."""

    max_increase: float = Field(ge=0, le=1)
    critical: bool = Field(default=False, description="A failure rolls back at once, between intervals")
    min_samples: int | None = Field(
        default=None, ge=10, description="Per arm, for this gate (traces, feedback: fewer than requests)"
    )


class CeilingGate(Strict):
    """The candidate's own rate may be at most max (a fraction)."""

    max: float = Field(gt=0, le=1)
    critical: bool = False


class RatioGate(Strict):
    """Candidate / base may be at most max (e.g. 1.2: 20% slower)."""

    max: float = Field(gt=0, le=100)
    critical: bool = False
    min_samples: int | None = Field(
        default=None, ge=10, description="Per arm, for this gate (traces: fewer than requests)"
    )


class ScoreGate(Strict):
    """An evaluator's mean score, base - candidate, at most max_decrease (0.05: five points of [0, 1])."""

    max_decrease: float = Field(ge=0, le=1)
    critical: bool = False
    min_samples: int | None = Field(
        default=None, ge=10, description="Results per arm before it may pass or fail (rollout.min_samples)"
    )


class LossGate(Strict):
    """Judged pairs: the candidate's share of losses minus its share of wins, at most max (0.05: five
    points more losses than wins)."""

    max: float = Field(ge=0, le=1)
    critical: bool = False
    min_samples: int | None = Field(
        default=None, ge=10, description="Judged pairs before it may pass or fail (rollout.min_samples)"
    )


AnyGate = RateGate | CeilingGate | RatioGate | ScoreGate | LossGate


class Gates(Strict):
    """Candidate against base over the same window. Omitted gates are not checked. The quality gates are
    per evaluator (evaluation.evaluators), named "eval_score_decrease:NAME" and "pairwise_loss_rate:NAME"
    in verdicts and metrics."""

    error_rate: RateGate | None = None
    validation_failure_rate: RateGate | None = None
    fallback_rate: CeilingGate | None = None
    latency_p99_ratio: RatioGate | None = None
    ttft_p50_ratio: RatioGate | None = None
    output_tokens_ratio: RatioGate | None = None
    cost_per_request_ratio: RatioGate | None = None
    # Per finished trace (assignment.trace_keys): an agent run's cost, model calls, and whether any of its
    # steps fell back, failed validation, failed or failed an evaluator.
    cost_per_trace_ratio: RatioGate | None = None
    steps_per_trace_ratio: RatioGate | None = None
    trace_failure_rate: RateGate | None = None
    negative_feedback_rate: RateGate | None = None  # over the feedback received, not the requests
    escalation_rate: RateGate | None = None
    eval_score_decrease: dict[str, ScoreGate] = Field(
        default_factory=dict, description="Per evaluator of evaluation.evaluators (not pairwise)"
    )
    pairwise_loss_rate: dict[str, LossGate] = Field(
        default_factory=dict, description="Per pairwise evaluator of evaluation.evaluators"
    )

    def configured(self) -> list[tuple[str, AnyGate]]:
        """Every gate set, by the name its verdicts carry; the quality gates one per evaluator."""
        out: list[tuple[str, AnyGate]] = []
        for name, gate in self:
            if isinstance(gate, dict):
                out.extend((f"{name}:{evaluator}", g) for evaluator, g in gate.items())
            elif gate is not None:
                out.append((name, gate))
        return out


QUALITY_GATES = ("eval_score_decrease", "pairwise_loss_rate")
TRACE_GATES = ("cost_per_trace_ratio", "steps_per_trace_ratio", "trace_failure_rate")
# What only users' own traffic can measure: shadow calls get no feedback and form no trace, so a
# mirror-only phase is judged without these.
LIVE_ONLY_GATES = frozenset({*TRACE_GATES, "negative_feedback_rate", "escalation_rate"})


DEFAULT_GATES = Gates(
    error_rate=RateGate(max_increase=0.005, critical=True),
    validation_failure_rate=RateGate(max_increase=0.002, critical=True),
    latency_p99_ratio=RatioGate(max=1.2),
)


# What a held-out set can measure (no feedback, escalations, fallbacks or streams before any user).
PREFLIGHT_GATES = (
    "error_rate", "validation_failure_rate", "latency_p99_ratio", "output_tokens_ratio",
    "cost_per_request_ratio", *QUALITY_GATES,
)  # fmt: skip
# The scores of an item's own expectations (expected.tool, .arguments, .contains, .answer): gateable in
# pre-flight by these names, as evaluators are.
EXPECTED_SCORES = ("expected_tool", "expected_arguments", "expected_contains", "expected_answer")


class Preflight(Strict):
    """The rollout's first phase: the candidate against the base on a held-out set, before any user or
    shadow call reaches it. Passed: the rollout goes on (shadow_first, or the first step); failed: it
    rolls back (or holds, with on_fail: hold); undecided (too few items to tell): it holds."""

    dataset: str | None = Field(
        default=None,
        description="The held-out set (JSONL), relative to the policy file; without it the phase waits for "
        "a pre-flight run elsewhere and recorded (canarygate preflight --record)",
    )
    gates: Gates | None = Field(
        default=None,
        description="Default: the rollout's gates a held-out set can measure; quality gates may also name "
        "expected_tool, expected_arguments, expected_contains, expected_answer",
    )
    min_samples: int = Field(default=20, ge=5, description="Answers per arm before a gate may pass or fail")
    samples: int = Field(default=1, ge=1, le=20, description="Answers per item and arm (sampling noise)")
    limit: int | None = Field(default=None, ge=1, description="Items of the set to use (the first ones)")
    concurrency: int = Field(default=2, ge=1, le=64, description="Items in flight at once")
    timeout_s: float = Field(default=1800, ge=1, le=86400, description="The whole run; past it: undecided")

    def judged_gates(self, rollout: Gates) -> Gates:
        """The gates pre-flight judges: its own, or the rollout's it can measure."""
        if self.gates is not None:
            return self.gates
        kept = {name: getattr(rollout, name) for name in PREFLIGHT_GATES}
        return Gates.model_construct(**kept)


BOTH_MODES = "set either weight (manual mode) or steps (automatic mode), not both"
SHADOW_NEEDS_STEPS = "shadow_first needs steps"
STEPS_NEED_CANDIDATE = "rollout.steps needs arms.candidate"
COHORTS_NEEDED = "rollout.cohorts and rollout.segments need cohorts (source and values)"
# Fields that cannot be set together, or one without the other, told whatever their values: the loader
# checks them on the file as written, so that a wrong value in one does not hide them (the models' own
# checks say the same, in the same words, once the values are right).
# (field, other field, together: True when both set is wrong, False when one without the other is)
EXCLUSIVE: list[tuple[str, str, bool, str]] = [
    ("rollout.steps", "rollout.weight", True, BOTH_MODES),
    ("rollout.shadow_first", "rollout.steps", False, SHADOW_NEEDS_STEPS),
    ("rollout.steps", "arms.candidate", False, STEPS_NEED_CANDIDATE),
    ("rollout.cohorts", "cohorts", False, COHORTS_NEEDED),
    ("rollout.segments", "cohorts", False, COHORTS_NEEDED),
]


def exclusive_problems(data: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(location, message) for each EXCLUSIVE rule the policy as written breaks."""
    found: list[tuple[tuple[str, ...], str]] = []
    for field, other, together, message in EXCLUSIVE:
        if _present(data, field) and _present(data, other) == together:
            found.append((tuple(field.split(".")), message))
    return found


def _present(data: Mapping[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return False
        node = node[part]
    return True


class Rollout(Strict):
    weight: float = Field(
        default=0, ge=0, le=100, description="Manual mode: percent of units served by the candidate"
    )
    steps: list[Annotated[float, Field(gt=0, le=100)]] | None = Field(
        default=None, description="Automatic mode: the weights the controller walks, e.g. [1, 5, 25, 50, 100]"
    )
    shadow_first: bool = Field(
        default=False, description="Start with a mirror-only phase (weight 0) judged on shadow traffic"
    )
    interval_s: float = Field(default=300, ge=1, le=86400, description="How often the gates are judged")
    min_samples: int = Field(default=500, ge=10, description="Per arm, before a gate may pass or fail")
    confidence: float = Field(
        default=0.99, ge=0.5, le=0.9999, description="Chance an identical candidate completes the rollout"
    )
    gates: Gates = Field(default_factory=lambda: DEFAULT_GATES)
    cohorts: Targeting | None = Field(default=None, description="Which cohorts the candidate may serve")
    segments: Segments | None = Field(default=None, description="Judge every gate per cohort as well")
    on_fail: Literal["rollback", "hold"] = "rollback"
    on_no_data: Literal["hold", "pass"] = "hold"
    preflight: Preflight | None = Field(
        default=None,
        description="A first phase on a held-out set, before shadow traffic (automatic mode); in manual "
        "mode, what `canarygate preflight` judges",
    )

    @field_validator("steps")
    @classmethod
    def _increasing(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if not value:
                raise ValueError("list at least one weight, e.g. [1, 5, 25, 50, 100]")
            if any(b <= a for a, b in pairwise(value)):
                raise ValueError(f"must increase step by step, got {value}")
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> Rollout:
        if self.steps is not None and "weight" in self.model_fields_set:
            raise ValueError(BOTH_MODES)
        if self.steps is None and "shadow_first" in self.model_fields_set:
            raise ValueError(SHADOW_NEEDS_STEPS)
        if self.steps is None and self.preflight is not None and self.preflight.dataset is not None:
            raise ValueError(
                "preflight.dataset needs steps: the pre-flight phase is an automatic rollout's; in manual "
                "mode the section only sets what `canarygate preflight` judges"
            )
        if self.steps is not None and not self.gates.configured():
            raise ValueError("gates: automatic mode needs at least one gate")
        return self


class Policy(Strict):
    route: str = Field(description="The name clients send as model=")
    description: str | None = None
    arms: Arms
    timeouts: Timeouts = Field(default_factory=Timeouts)
    assignment: Assignment = Field(default_factory=Assignment)
    traces: Traces = Field(default_factory=Traces)
    rollout: Rollout = Field(default_factory=Rollout)
    validation: Validation = Field(default_factory=Validation)
    fallback: Fallback = Field(default_factory=Fallback)
    mirror: Mirror = Field(default_factory=Mirror)
    cohorts: Cohorts | None = Field(default=None, description="Group requests for metrics, targeting, gates")
    evaluation: Evaluation = Field(default_factory=Evaluation)
    answer_model: Literal["upstream", "route"] = Field(
        default="upstream",
        description="What `model` in an answer says: the model that answered, as its server names it "
        "(which tells the arm), or the route's name, as the client sent it (blind: which arm answered is "
        "only in the x-canarygate-arm header)",
    )

    @field_validator("route")
    @classmethod
    def _route(cls, value: str) -> str:
        if not ROUTE_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a route name: 1-128 characters, letters, digits and . _ : / @ + -"
            )
        return value

    @model_validator(mode="after")
    def _candidate_needed(self) -> Policy:
        if self.arms.candidate is None:
            if self.rollout.weight > 0:
                raise ValueError("rollout.weight is above 0 but arms.candidate is not defined")
            if self.rollout.steps is not None:
                raise ValueError(STEPS_NEED_CANDIDATE)
            if self.mirror.percent > 0:
                raise ValueError("mirror.percent is above 0 but arms.candidate is not defined")
            if self.mirror.noise_floor_percent > 0:
                raise ValueError("mirror.noise_floor_percent is set but arms.candidate is not defined")
            if self.assignment.allow_override_header:
                raise ValueError("assignment.allow_override_header needs arms.candidate")
        targeting = self.rollout.cohorts
        if (targeting is not None or self.rollout.segments is not None) and self.cohorts is None:
            raise ValueError(COHORTS_NEEDED)
        if targeting is not None and self.cohorts is not None:
            known = set(self.cohorts.names())
            for name in [*(targeting.include or []), *targeting.exclude]:
                if name not in known:
                    raise ValueError(f"rollout.cohorts: {name!r} is not a cohort; known: {sorted(known)}")
        priced = [a is not None and a.price is not None for a in (self.arms.base, self.arms.candidate)]
        for gate in ("cost_per_request_ratio", "cost_per_trace_ratio"):
            if getattr(self.rollout.gates, gate) is not None and self.rollout.steps and not all(priced):
                raise ValueError(f"rollout.gates.{gate} needs a price on both arms (arms.*.price)")
        traced = [g for g in TRACE_GATES if getattr(self.rollout.gates, g) is not None]
        if traced and not self.assignment.trace_keys:
            raise ValueError(
                f"rollout.gates.{traced[0]} needs assignment.trace_keys (where a trace is named)"
            )
        self._quality_gates()
        if self.rollout.shadow_first and self.mirror.percent <= 0:
            raise ValueError("rollout.shadow_first needs mirror.percent above 0 (shadow traffic to judge)")
        for name in ("base", "candidate"):
            arm = getattr(self.arms, name)
            if arm is not None and arm.timeouts is not None:
                problem = timeout_order_problem(merge_timeouts(self.timeouts, arm.timeouts))
                if problem:
                    raise ValueError(f"arms.{name}.timeouts merged with timeouts: {problem}")
        return self

    def _quality_gates(self) -> None:
        evaluators = {e.name: e for e in self.evaluation.evaluators}
        gates = self.rollout.gates
        for gate, wanted in (("eval_score_decrease", False), ("pairwise_loss_rate", True)):
            for name in getattr(gates, gate):
                evaluator = evaluators.get(name)
                if evaluator is None:
                    known = ", ".join(sorted(evaluators)) or "none declared"
                    raise ValueError(f"rollout.gates.{gate}: {name!r} is not an evaluator ({known})")
                if (evaluator.kind == "pairwise") != wanted:
                    use = "pairwise_loss_rate" if evaluator.kind == "pairwise" else "eval_score_decrease"
                    raise ValueError(
                        f"rollout.gates.{gate}: {name} is a {evaluator.kind} evaluator; use {use}"
                    )
                if evaluator.on_pairs and self.mirror.percent <= 0:
                    raise ValueError(
                        f"rollout.gates.{gate}: {name} is judged on shadow pairs: set mirror.percent above 0"
                    )
                if not evaluator.on_pairs and not {"base", "candidate"} <= set(evaluator.arms):
                    raise ValueError(
                        f"rollout.gates.{gate}: {name} must evaluate both arms (arms: [base, candidate])"
                    )
        self._preflight_gates(evaluators)
        pairs = [e.name for e in self.evaluation.evaluators if e.on_pairs]
        if pairs and self.mirror.percent <= 0 and self.mirror.noise_floor_percent <= 0:
            raise ValueError(f"evaluators {', '.join(pairs)} judge shadow pairs: set mirror.percent above 0")

    def _preflight_gates(self, evaluators: dict[str, Evaluator]) -> None:
        preflight = self.rollout.preflight
        if preflight is None or preflight.gates is None:
            return
        where = "rollout.preflight.gates"
        for name, gate in preflight.gates:
            if gate and name not in PREFLIGHT_GATES:
                raise ValueError(
                    f"{where}.{name}: a held-out set cannot measure it (no users yet); use "
                    f"{', '.join(PREFLIGHT_GATES)}"
                )
        for gate, wanted in (("eval_score_decrease", False), ("pairwise_loss_rate", True)):
            for name in getattr(preflight.gates, gate):
                evaluator = evaluators.get(name)
                if evaluator is None and not (gate == "eval_score_decrease" and name in EXPECTED_SCORES):
                    known = ", ".join([*sorted(evaluators), *EXPECTED_SCORES])
                    raise ValueError(f"{where}.{gate}: {name!r} is not an evaluator ({known})")
                if evaluator is not None and (evaluator.kind == "pairwise") != wanted:
                    use = "pairwise_loss_rate" if evaluator.kind == "pairwise" else "eval_score_decrease"
                    raise ValueError(f"{where}.{gate}: {name} is a {evaluator.kind} evaluator; use {use}")
        if not preflight.gates.configured():
            raise ValueError(f"{where}: set at least one gate, or leave gates out to use the rollout's")


def merge_timeouts(route: Timeouts, arm: TimeoutOverrides | None) -> Timeouts:
    if arm is None:
        return route
    overrides = {k: v for k, v in arm.model_dump().items() if v is not None}
    return Timeouts.model_construct(**{**route.model_dump(), **overrides})
