"""Cost: per-arm token prices turned into canarygate_cost_total, served and shadow cost apart."""

from __future__ import annotations

import pytest

from tests.conftest import GatewayFactory, Sim, policy_yaml, wait_for
from tests.test_metrics import scrape, value

PRICES = {"base": (0.5, 1.5), "candidate": (0.2, 0.6)}  # per million tokens: input, output


def priced_policy(sims: tuple[Sim, Sim], extra: str = "") -> str:
    base_in, base_out = PRICES["base"]
    cand_in, cand_out = PRICES["candidate"]
    return policy_yaml(
        "chat",
        sims[0].url,
        sims[1].url,
        extra=extra,
        base_extra=f"price: {{input_per_million: {base_in}, output_per_million: {base_out}}}",
        candidate_extra=f"price: {{input_per_million: {cand_in}, output_per_million: {cand_out}}}",
    )


def test_cost_is_exact_for_known_token_counts_and_mirror_cost_is_kept_apart(
    sims: tuple[Sim, Sim], make_gateway: GatewayFactory
) -> None:
    for sim in sims:
        sim.set_knobs(output_tokens=7)
    gw = make_gateway({"chat": priced_policy(sims, extra="mirror: {percent: 100, sample_by: request}")})
    usages = []
    for i in range(10):
        body = {"model": "chat", "user": f"u{i}", "messages": [{"role": "user", "content": "one two three"}]}
        usages.append(gw.post("/v1/chat/completions", json=body).json()["usage"])
    assert all(u["completion_tokens"] == 7 for u in usages)
    prompt = usages[0]["prompt_tokens"]
    served = sum(u["prompt_tokens"] * 0.5 + u["completion_tokens"] * 1.5 for u in usages) / 1e6
    shadow = 10 * (prompt * 0.2 + 7 * 0.6) / 1e6  # the candidate saw the same prompts

    def counted(arm: str, mode: str) -> float:
        return value(scrape(gw.url), "canarygate_cost_total", route="chat", arm=arm, mode=mode)

    wait_for(lambda: counted("candidate", "mirror") > 0, message="the shadow calls")
    wait_for(lambda: counted("candidate", "mirror") == pytest.approx(shadow), message="every shadow call")
    assert counted("base", "primary") == pytest.approx(served)
    assert counted("candidate", "primary") == 0  # mirror cost is never served cost


def test_the_cost_gate_needs_prices_on_both_arms(sims: tuple[Sim, Sim], tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.loader import load_dir

    text = policy_yaml("chat", sims[0].url, sims[1].url).replace("rollout:\n  weight: 0\n", "")
    text += "rollout: {steps: [10, 100], gates: {cost_per_request_ratio: {max: 1.1}}}\n"
    (tmp_path / "chat.yaml").write_text(text)
    _, problems = load_dir(tmp_path)
    assert any("needs a price on both arms" in p.message for p in problems)
