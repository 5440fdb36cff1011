"""schemathesis against the gateway's own OpenAPI document (/openapi.json): every operation it describes
(models, feedback, health, the admin API) fed generated requests on a real loopback server. No
answer may be a 5xx, and every error must be in OpenAI's format."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import GatewayFactory, Sim, policy_yaml

TOKEN = "openapi-admin-token"


def test_every_described_operation_answers_without_a_server_error(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    automatic = "rollout:\n  steps: [10, 50, 100]\n  interval_s: 60"
    gw = make_gateway(
        {
            "chat": policy_yaml("chat", sims[0].url, sims[1].url, weight=10, extra="mirror: {percent: 10}"),
            "auto": policy_yaml("auto", sims[0].url, sims[1].url).replace(
                "rollout:\n  weight: 0\n", automatic
            ),
        },
        admin_token=TOKEN,
    )
    schema = schemathesis.openapi.from_url(f"{gw.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert {"POST /v1/feedback", "GET /v1/models", "POST /admin/routes/{route}/{action}"} <= set(labels), (
        labels
    )
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            for authorization in (f"Bearer {TOKEN}", "Bearer wrong"):
                response = case.call(headers={"Authorization": authorization})
                case.validate_response(response, checks=[not_a_server_error])
                assert "Traceback" not in response.text
                if response.status_code >= 400:
                    error = response.json()["error"]
                    assert {"message", "type", "code"} <= error.keys(), response.text
                    assert error["message"]

        check()
