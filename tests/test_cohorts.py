"""Cohorts: requests grouped by one attribute into a bounded set, for targeting, metrics and gates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.loader import load_dir
from gateway.route import Route
from gateway.routing import cohort_of
from tests.conftest import GatewayFactory, Sim, policy_yaml


def route_with(tmp_path: Path, cohorts: str, rollout: str = "") -> Route:
    text = policy_yaml("chat", "http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", weight=100)
    text += cohorts + "\n"
    if rollout:
        text = text.replace("rollout:\n  weight: 100\n", f"rollout:\n  weight: 100\n{rollout}\n")
    directory = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    (directory / "chat.yaml").write_text(text)
    routes, problems = load_dir(directory)
    assert not [p for p in problems if p.severity == "error"], problems
    return routes["chat"]


def problems_of(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "chat.yaml").write_text(text)
    return [p.message for p in load_dir(tmp_path)[1] if p.severity == "error"]


def test_every_source_maps_to_a_declared_value_or_other(tmp_path: Path) -> None:
    by_header = route_with(tmp_path, "cohorts: {source: header:X-Tenant, values: [acme, globex]}")
    assert cohort_of(by_header, {"x-tenant": "acme"}, {}, None) == "acme"
    assert cohort_of(by_header, {"x-tenant": "initech"}, {}, None) == "other"
    assert cohort_of(by_header, {}, {}, None) == "other"
    by_metadata = route_with(tmp_path, "cohorts: {source: 'metadata:intent', values: [billing, support]}")
    assert cohort_of(by_metadata, {}, {"metadata": {"intent": "billing"}}, None) == "billing"
    assert cohort_of(by_metadata, {}, {"metadata": {"intent": 7}}, None) == "other"
    assert cohort_of(by_metadata, {}, {"metadata": "billing"}, None) == "other"
    by_group = route_with(tmp_path, "cohorts: {source: api_key_group, values: [enterprise]}")
    assert cohort_of(by_group, {}, {}, "enterprise") == "enterprise"
    assert cohort_of(by_group, {}, {}, None) == "other"
    tools = route_with(tmp_path, "cohorts: {source: tools}")
    assert cohort_of(tools, {}, {"tools": [{"type": "function"}]}, None) == "true"
    assert cohort_of(tools, {}, {"tools": []}, None) == "false"
    json_mode = route_with(tmp_path, "cohorts: {source: json_mode}")
    assert cohort_of(json_mode, {}, {"response_format": {"type": "json_schema"}}, None) == "true"
    assert cohort_of(json_mode, {}, {"response_format": {"type": "text"}}, None) == "false"
    stream = route_with(tmp_path, "cohorts: {source: stream}")
    assert cohort_of(stream, {}, {"stream": True}, None) == "true"
    plain = route_with(tmp_path, "")
    assert cohort_of(plain, {"x-tenant": "acme"}, {}, None) == "all"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("cohorts: {source: 'cookie:x', values: [a]}", "is not a cohort source"),
        ("cohorts: {source: header:x-tenant}", "list the cohorts in values"),
        ("cohorts: {source: tools, values: [a]}", "always 'true' and 'false'"),
        ("cohorts: {source: header:x-tenant, values: [other]}", "cannot be a cohort"),
        ("cohorts: {source: header:x-tenant, values: [a, a]}", "listed twice"),
    ],
)
def test_bad_cohort_definitions_say_what_to_fix(tmp_path: Path, extra: str, message: str) -> None:
    text = policy_yaml("chat", "http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1") + extra + "\n"
    assert any(message in m for m in problems_of(tmp_path, text))


def test_targeting_names_known_cohorts(tmp_path: Path) -> None:
    text = policy_yaml("chat", "http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1")
    text = text.replace("rollout:\n  weight: 0\n", "rollout:\n  weight: 10\n  cohorts: {exclude: [acme]}\n")
    assert any("need cohorts" in m for m in problems_of(tmp_path, text))
    text += "cohorts: {source: header:x-tenant, values: [globex]}\n"
    assert any("'acme' is not a cohort" in m for m in problems_of(tmp_path, text))


def test_excluded_cohorts_always_get_base_and_send_no_shadow_calls(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    text = policy_yaml("chat", sims[0].url, sims[1].url, weight=100).replace(
        "rollout:\n  weight: 100\n",
        "rollout:\n  weight: 100\n  cohorts: {include: [support, other], exclude: [other]}\n",
    )
    text += "cohorts: {source: 'metadata:intent', values: [support, billing]}\n"
    gw = make_gateway({"chat": text})

    def arm(intent: Any) -> str:
        body = {
            "model": "chat",
            "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"intent": intent},
        }
        response = gw.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.headers["x-canarygate-arm"]

    assert {arm("support") for _ in range(5)} == {"candidate"}
    assert {arm("billing") for _ in range(5)} == {"base"}  # not included
    assert {arm("something else") for _ in range(5)} == {"base"}  # other: excluded


def test_api_key_groups_come_from_the_keys_file(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    from gateway.settings import Settings

    keys = tmp_path / "keys"
    keys.write_text("# key group\nsk-acme-1 enterprise\nsk-free-1\n")
    settings = Settings.from_env({"CANARYGATE_API_KEYS_FILE": str(keys)})
    assert settings.api_keys == frozenset({"sk-acme-1", "sk-free-1"})
    text = policy_yaml("chat", sims[0].url, sims[1].url, weight=100).replace(
        "rollout:\n  weight: 100\n", "rollout:\n  weight: 100\n  cohorts: {exclude: [enterprise]}\n"
    )
    text += "cohorts: {source: api_key_group, values: [enterprise]}\n"
    gw = make_gateway({"chat": text}, api_keys=settings.api_keys, api_key_groups=settings.api_key_groups)

    def arm(key: str) -> str:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(
            f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
        return response.headers["x-canarygate-arm"]

    assert arm("sk-acme-1") == "base"  # the enterprise group is left out of the rollout
    assert arm("sk-free-1") == "candidate"


def test_metrics_carry_the_cohort_and_stay_bounded_under_thousands_of_values(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    from tests.test_metrics import scrape, value

    text = policy_yaml("chat", sims[0].url, sims[1].url, weight=50)
    text += "cohorts: {source: header:x-tenant, values: [acme, globex]}\n"
    gw = make_gateway({"chat": text})
    before = scrape(gw.url)
    with httpx.Client(timeout=10) as client:
        for i in range(1000):
            tenant = "acme" if i % 10 == 0 else f"tenant-{i}"  # 900 distinct unlisted values
            body = {"model": "chat", "user": f"u{i}", "messages": [{"role": "user", "content": "hi"}]}
            response = client.post(f"{gw.url}/v1/chat/completions", json=body, headers={"x-tenant": tenant})
            assert response.status_code == 200
    after = scrape(gw.url)
    assert set(after) == set(before)  # every series existed before: no label value came from a client
    cohorts = {dict(labels).get("cohort") for name, labels in after if name == "canarygate_requests_total"}
    assert cohorts == {"acme", "globex", "other", "all"}  # "all": requests rejected before a cohort
    served = {
        cohort: value(
            after, "canarygate_requests_total", route="chat", mode="primary", outcome="ok", cohort=cohort
        )
        for cohort in ("acme", "globex", "other")
    }
    assert served == {"acme": 100, "globex": 0, "other": 900}


def test_a_regression_in_one_cohort_is_rolled_back_by_its_own_gate_while_the_aggregate_passes(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:

    from tests.conftest import CANDIDATE_MODEL
    from tests.test_state import drive_until

    admin = {"Authorization": "Bearer admin-secret"}
    httpx.put(
        f"{sims[1].server.url}/sim/knobs",
        json={"models": {f"{CANDIDATE_MODEL}@billing": {"invalid_json_rate": 0.4}}},
    ).raise_for_status()
    text = policy_yaml("chat", sims[0].url, sims[1].url).replace("rollout:\n  weight: 0\n", "")
    text += """
cohorts: {source: 'metadata:intent', values: [billing, support]}
rollout:
  steps: [50, 100]
  interval_s: 1
  min_samples: 60
  gates:
    validation_failure_rate: {max_increase: 0.05, critical: true}
  segments: {by: cohort, min_share: 0.05}
"""
    gw = make_gateway({"chat": text}, admin_token="admin-secret")

    def intent(i: int) -> dict[str, object]:
        name = "billing" if i % 10 == 0 else "support"  # billing: a tenth of the traffic
        return {"metadata": {"intent": name, "sim_profile": name}}

    drive_until(gw.url, "rolled_back", timeout=60, json_mode=True, extra=intent)
    reason = httpx.get(f"{gw.url}/admin/routes/chat", headers=admin).json()["history"][0]["reason"]
    assert reason.startswith("gate failed: validation_failure_rate [cohort billing]"), reason
    gates = httpx.get(f"{gw.url}/admin/routes/chat/analysis", headers=admin).json()["gates"]
    by_cohort = {g["cohort"]: g for g in gates if g["gate"] == "validation_failure_rate"}
    # The verdicts the controller decided on: the average hides it (4% expected, against an allowed 5%),
    # so it did not fail (it may still have been waiting for a narrower interval); billing's own gate did.
    assert by_cohort["all"]["result"] in ("pass", "wait")
    assert by_cohort["all"]["value"] < by_cohort["billing"]["value"]
    assert by_cohort["billing"]["result"] == "fail"
    assert by_cohort["support"]["result"] == "pass"
    assert "other" not in by_cohort  # below min_share: not judged alone
