"""The provider price table: which row a request is billed by, and what an operator may change."""

from __future__ import annotations

import pytest

from hookd import prices

TABLE = prices.DEFAULT_TABLE


@pytest.mark.parametrize(
    ("provider", "model", "row"),
    [
        ("anthropic", "claude-sonnet-4-5-20250929", "anthropic"),
        ("bedrock", "claude-opus-4-6", "anthropic"),
        ("openai", "gpt-4o", "openai"),
        ("openai", "gpt-5-mini", "gpt-5"),
        ("openai", "deepseek-chat", "deepseek"),
        ("mistral", "mistral-large", "default"),
    ],
)
def test_a_request_is_billed_by_its_model_family_first(provider: str, model: str, row: str) -> None:
    assert prices.resolve(TABLE, provider, model) == TABLE[row]


def test_an_override_changes_only_the_fields_it_names_and_reaches_aliases() -> None:
    table = prices.merged(prices.validate({"anthropic": {"ttl": 60}, "mistral": {"read": 0.2}}))
    claude = prices.resolve(table, "anthropic", "claude-opus-4-6")
    assert claude.ttl == 60 and claude.read == 0.1 and claude.write == 1.25
    assert prices.resolve(table, "mistral", "mistral-large").read == 0.2


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ({"anthropic": {"read": 1.5}}, "from 0 to 1"),
        ({"anthropic": {"write": 0.5}}, "from 1 to 10"),
        ({"anthropic": {"ttl": 0}}, "seconds from 1"),
        ({"anthropic": {"breakpoints": "yes"}}, "true or false"),
        ({"anthropic": {"min_tokens": 1.5}}, "an integer"),
        ({"Anthropic": {"read": 0.1}}, "lowercase"),
        ({"anthropic": "cheap"}, "must be an object"),
    ],
)
def test_bad_overrides_are_refused(override: dict[str, object], complaint: str) -> None:
    with pytest.raises(prices.InvalidPrices, match=complaint):
        prices.validate(override)


def test_usage_is_billed_in_input_token_equivalents() -> None:
    usage = prices.Usage(input=100, cache_read=1000, cache_write=200, cache_write_long=10)
    assert usage.cost(TABLE["anthropic"]) == pytest.approx(100 + 100 + 250 + 20)
    assert usage.total == 1310
