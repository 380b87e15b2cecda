"""Aperture `entire_request` events in the shapes providers and Aperture send, for tests and benchmarks.

Each shape carries the given bill (`hookd.prices.Usage`) the way that provider reports it:
Anthropic's Messages API (a response body, or the SSE events of a stream: `message_start` with
the input usage, `message_delta` with the output), OpenAI's Chat Completions (a response body, or
the chunks of a stream with `stream_options.include_usage`, the last one carrying `usage`), or
only Aperture's `metadata.estimated_cost` (the grant sends no response). The response text is a
marker a test can look for where nothing of an event may be kept.
"""

from __future__ import annotations

from typing import Any

from hookd.prices import Usage

SHAPES = ("anthropic", "anthropic-stream", "openai", "openai-stream", "estimated-cost")
SECRET_TEXT = "SECRET-RESPONSE-TEXT-7f3a"
OUTPUT_TOKENS = 42


def metadata(request_id: str, provider: str, model: str, user: str) -> dict[str, Any]:
    return {
        "login_name": user,
        "user_agent": "claude-cli/2.1.39 (external, cli)",
        "url": "https://aperture.example.ts.net/v1/messages",
        "model": model,
        "provider": provider,
        "tailnet_name": "example.ts.net",
        "stable_node_id": "nSTABLE123",
        "request_id": request_id,
        "session_id": "sess-events",
    }


def event(
    shape: str,
    request_id: str,
    usage: Usage,
    provider: str = "anthropic",
    model: str = "",
    user: str = "dev@example.com",
    estimated_cost: bool = False,
) -> dict[str, Any]:
    """An event reporting `usage` in `shape`; with `estimated_cost`, Aperture's summary too."""
    model = model or ("claude-sonnet-4-5-20250929" if shape.startswith("anthropic") else "gpt-4o")
    document: dict[str, Any] = {"metadata": metadata(request_id, provider, model, user)}
    if shape == "anthropic":
        document["response_body"] = anthropic_message(model, anthropic_usage(usage, OUTPUT_TOKENS))
    elif shape == "anthropic-stream":
        document["raw_responses"] = anthropic_stream(model, usage)
    elif shape == "openai":
        document["response_body"] = openai_completion(model, usage)
    elif shape == "openai-stream":
        document["raw_responses"] = openai_chunks(model, usage)
    elif shape != "estimated-cost":
        raise ValueError(shape)
    if estimated_cost or shape == "estimated-cost":
        document["metadata"]["estimated_cost"] = aperture_cost(provider, model, usage)
    return document


def anthropic_usage(usage: Usage, output: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.input,
        "cache_creation_input_tokens": usage.cache_write + usage.cache_write_long,
        "cache_read_input_tokens": usage.cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_write,
            "ephemeral_1h_input_tokens": usage.cache_write_long,
        },
        "output_tokens": output,
        "service_tier": "standard",
    }


def anthropic_message(model: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": SECRET_TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def anthropic_stream(model: str, usage: Usage) -> list[dict[str, Any]]:
    start = anthropic_message(model, anthropic_usage(usage, 1))
    start.update(content=[], stop_reason=None)
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
            for word in SECRET_TEXT.split("-")
        ),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": OUTPUT_TOKENS},
        },
        {"type": "message_stop"},
    ]


def openai_usage(usage: Usage) -> dict[str, Any]:
    # OpenAI has no cache writes: whatever was not read is billed as input.
    prompt = usage.total
    return {
        "prompt_tokens": prompt,
        "completion_tokens": OUTPUT_TOKENS,
        "total_tokens": prompt + OUTPUT_TOKENS,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def openai_completion(model: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": SECRET_TEXT, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": openai_usage(usage),
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035",
    }


def openai_chunks(model: str, usage: Usage) -> list[dict[str, Any]]:
    head = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": model}
    head["system_fingerprint"] = "fp_44709d6fcb"
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": word} for word in SECRET_TEXT.split("-")]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}], "usage": None}
        for d in deltas
    ]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None})
    chunks.append({**head, "choices": [], "usage": openai_usage(usage)})
    return chunks


def aperture_cost(provider: str, model: str, usage: Usage) -> dict[str, Any]:
    """Aperture's CostEstimate: its `input_tokens` leave the cached and written ones out."""
    return {
        "dollars": 0.0042,
        "cost_basis": f"{provider}/{model}",
        "usage": {
            "input_tokens": usage.input,
            "output_tokens": OUTPUT_TOKENS,
            "cached_tokens": usage.cache_read,
            "cache_creation_input_tokens": usage.cache_write + usage.cache_write_long,
            "cache_creation_5m_input_tokens": usage.cache_write,
            "cache_creation_1h_input_tokens": usage.cache_write_long,
        },
    }
