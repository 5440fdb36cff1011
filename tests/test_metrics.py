"""/metrics after traffic through base, candidate, fallback and failure paths: exact values per label set."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, GatewayFactory, Sim, policy_yaml, wait_for
from tests.test_cli import route_a_dir

CHAT = {"messages": [{"role": "user", "content": "one two three four"}]}  # 4 prompt tokens in the simulator


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    """The sample with exactly these labels, or the sum over the series that carry them and more
    (e.g. every cohort), as `sum` without those labels would give in PromQL."""
    exact = samples.get((name, tuple(sorted(labels.items()))))
    if exact is not None:
        return exact  # type: ignore[no-any-return]
    wanted = set(labels.items())
    matching = [v for (n, ls), v in samples.items() if n == name and wanted <= set(ls)]
    if not matching:
        raise KeyError((name, labels))
    return sum(matching)


def test_exact_values_after_mixed_traffic(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    base, candidate = sims
    gw = make_gateway(
        {
            "chat": policy_yaml("chat", base.url, candidate.url, weight=100),
            "plain": policy_yaml("plain", base.url),
        },
    )
    post = lambda body: gw.post("/v1/chat/completions", json=body)  # noqa: E731

    assert post({"model": "chat", **CHAT}).status_code == 200  # candidate ok
    assert post({"model": "chat", **CHAT}).status_code == 200  # candidate ok
    candidate.set_knobs(error_rate=1, error_status=503)
    assert post({"model": "chat", **CHAT}).headers["x-canarygate-fallback"] == "http_5xx"
    candidate.set_knobs(error_rate=0, invalid_json_rate=1)
    json_mode = {"model": "chat", **CHAT, "response_format": {"type": "json_object"}}
    assert post(json_mode).headers["x-canarygate-fallback"] == "json_parse"
    candidate.set_knobs(invalid_json_rate=0)
    with httpx.stream(
        "POST", f"{gw.url}/v1/chat/completions", json={"model": "chat", **CHAT, "stream": True}
    ) as r:
        r.read()  # a stream without a usage report
    usage_stream = {"model": "chat", **CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=usage_stream) as r:
        r.read()
    assert post({"model": "nope", **CHAT}).status_code == 404
    assert gw.post("/v1/chat/completions", content=b"{oops").status_code == 400
    base.set_knobs(invalid_json_rate=1)
    assert post({"model": "plain", **CHAT, "response_format": {"type": "json_object"}}).status_code == 200

    s = scrape(gw.url)
    total = "canarygate_requests_total"
    assert value(s, total, route="chat", arm="candidate", mode="primary", outcome="ok") == 4
    assert value(s, total, route="chat", arm="candidate", mode="primary", outcome="upstream_error") == 1
    assert value(s, total, route="chat", arm="candidate", mode="primary", outcome="invalid_output") == 1
    assert value(s, total, route="chat", arm="base", mode="primary", outcome="ok") == 2
    assert value(s, total, route="plain", arm="base", mode="primary", outcome="ok") == 1
    assert value(s, total, route="unknown", arm="none", mode="primary", outcome="rejected") == 2
    assert value(s, total, route="chat", arm="candidate", mode="mirror", outcome="ok") == 0  # pre-initialised

    fallbacks = "canarygate_fallbacks_total"
    assert value(s, fallbacks, route="chat", reason="http_5xx") == 1
    assert value(s, fallbacks, route="chat", reason="json_parse") == 1
    assert value(s, fallbacks, route="chat", reason="circuit_open") == 0

    failures = "canarygate_validation_failures_total"
    assert value(s, failures, route="chat", arm="candidate", mode="primary", kind="json_parse") == 1
    assert value(s, failures, route="plain", arm="base", mode="primary", kind="json_parse") == 1  # recorded
    assert value(s, failures, route="chat", arm="base", mode="primary", kind="tool_choice") == 0

    # Tokens come from usage: 2 candidate answers of 16 tokens, the invalid JSON answer (its usage is
    # real spend), and the stream that reported usage; the stream that did not is counted as missing.
    tokens = "canarygate_tokens_total"
    invalid_json_tokens = (
        value(s, tokens, route="chat", arm="candidate", mode="primary", type="output") - 3 * 16
    )
    assert invalid_json_tokens > 0
    assert value(s, tokens, route="chat", arm="candidate", mode="primary", type="input") == 4 * 4
    assert value(s, tokens, route="chat", arm="base", mode="primary", type="input") == 2 * 4
    assert value(s, "canarygate_usage_missing_total", route="chat", arm="candidate", mode="primary") == 1

    candidate_attempts = 6
    assert (
        value(s, "canarygate_request_duration_seconds_count", route="chat", arm="candidate", mode="primary")
        == candidate_attempts
    )
    assert (
        value(
            s, "canarygate_time_to_first_token_seconds_count", route="chat", arm="candidate", mode="primary"
        )
        == 2
    )
    assert value(s, "canarygate_overhead_seconds_count", route="chat") == 6
    assert value(s, "canarygate_rollout_weight", route="chat") == 100
    assert value(s, "canarygate_rollout_phase", route="chat", phase="manual") == 1
    assert value(s, "canarygate_circuit_open", route="chat", arm="candidate") == 0
    assert value(s, "canarygate_inflight_requests", route="chat", arm="candidate") == 0
    assert value(s, "canarygate_mirror_total", route="chat", outcome="dropped") == 0
    assert value(s, "canarygate_mirror_agreement_total", route="chat", check="tool_name", result="agree") == 0


def test_every_metric_is_documented_in_the_readme(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=10)})
    text = httpx.get(f"{gw.url}/metrics").text
    exposed = {
        f.name + ("_total" if f.type == "counter" else "")
        for f in text_string_to_metric_families(text)
        if f.name.startswith("canarygate_")
    }
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `(canarygate_[a-z_]+)` \|", readme, re.M))
    assert exposed == documented


def test_circuit_gauge_and_reloads(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    sims[1].set_knobs(error_rate=1)
    extra = "fallback: {circuit_breaker: {window: 4, min_requests: 2, open_s: 60}}"
    gw = make_gateway(
        {"chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=100, extra=extra)}, watch_policies=True
    )
    for _ in range(3):
        gw.post("/v1/chat/completions", json={"model": "chat", **CHAT})
    s = scrape(gw.url)
    assert value(s, "canarygate_circuit_open", route="chat", arm="candidate") == 1
    assert value(s, "canarygate_fallbacks_total", route="chat", reason="circuit_open") == 1
    (gw.policy_dir / "chat.yaml").write_text("route: chat\narms: broken\n")
    wait_for(lambda: value(scrape(gw.url), "canarygate_policy_reloads_total", result="rejected") == 1)
    (gw.policy_dir / "chat.yaml").write_text(policy_yaml("chat", sims[0].url, sims[1].url, weight=30))
    wait_for(lambda: value(scrape(gw.url), "canarygate_rollout_weight", route="chat") == 30)
    assert value(scrape(gw.url), "canarygate_policy_reloads_total", result="ok") == 1


def test_metrics_can_be_switched_off(sims: tuple[Sim, Sim], make_gateway: GatewayFactory) -> None:
    gw = make_gateway({"chat": policy_yaml("chat", sims[0].url)}, metrics=False)
    gw.post("/v1/chat/completions", json={"model": "chat", **CHAT})
    assert not any(name == "canarygate_requests_total" for name, _ in scrape(gw.url))


def test_several_workers_share_one_metrics_view(sims: tuple[Sim, Sim], serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, url = serve(
        route_a_dir(tmp_path, sims[0]), "--workers", "2", env={"CANARYGATE_WATCH_POLICIES": "false"}
    )
    for _ in range(30):  # a new connection each time: both workers take requests
        assert httpx.post(f"{url}/v1/chat/completions", json={"model": "route-a", **CHAT}).status_code == 200
    for _ in range(10):  # whichever worker answers the scrape, it reports both workers' counts
        s = scrape(url)
        assert (
            value(s, "canarygate_requests_total", route="route-a", arm="base", mode="primary", outcome="ok")
            == 30
        )
