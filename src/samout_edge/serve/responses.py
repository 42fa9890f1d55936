"""OpenAI's Responses API (``POST /v1/responses``) as a chat completion in other clothes.

The openai SDK's newer entry point (``client.responses.create``) sends ``input`` (a text,
or a list of messages whose content is text or ``input_text`` parts) and ``instructions``;
this maps them onto ``ChatRequest`` (instructions first, as a system message), runs the
chat completion, and rewrites its answer (or its stream's chunks) into a ``response``
object and Responses' typed events. Nothing is kept: ``store`` true and
``previous_response_id`` are refused, as are tools and reasoning, by name.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from samout_edge.serve.errors import ApiError

TEXT_PARTS = ("input_text", "output_text", "text")


def _input_text(value: Any) -> Any:
    """A message's content: a text, or parts of the text kinds (joined by newlines, as chat's
    parts are); any other part (an image, a file) is refused by its type."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if isinstance(kind, str) else "not a content part"
            raise ValueError(f"part {i} is {what}: this server reads only text parts (input_text)")
        texts.append(part["text"])
    return "\n".join(texts)


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = "message"
    role: str
    content: Annotated[str, BeforeValidator(_input_text)]
    id: str | None = None
    status: str | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: dict[str, Any] | None = None  # only {"format": {"type": "text"}}
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    include: list[str] | None = None

    def unsupported(self) -> str | None:
        if self.tools or self.tool_choice not in (None, "none", "auto"):
            return "tools"
        if self.store:
            return "store (this server keeps no responses: send store: false)"
        if self.previous_response_id is not None:
            return "previous_response_id (this server keeps no responses; a session continues a conversation)"
        if self.reasoning:
            return "reasoning"
        if self.text not in (None, {}, {"format": {"type": "text"}}):
            return "text.format"
        if self.truncation not in (None, "disabled"):
            return "truncation"
        if self.include:
            return "include"
        return None

    def chat_body(self) -> dict[str, Any]:
        """The chat completion request this is."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            for i, m in enumerate(self.input):
                if m.type != "message":
                    raise ApiError(f"input.{i}.type: {m.type!r} items are not supported (messages only)", 400,
                                   "unsupported_parameter")
                messages.append({"role": m.role, "content": m.content})
        body: dict[str, Any] = {"messages": messages, "stream": self.stream}
        for ours, theirs in (("max_tokens", self.max_output_tokens), ("temperature", self.temperature),
                             ("top_p", self.top_p), ("user", self.user), ("metadata", self.metadata)):
            if theirs is not None:
                body[ours] = theirs
        return body


def response_object(req: ResponsesRequest, rid: str, created: int, text: str | None, finish: str | None,
                    usage: dict[str, int] | None, model: str) -> dict[str, Any]:
    """A ``response``: in progress (``text`` None), completed, or incomplete at max_output_tokens."""
    done = text is not None
    status = "in_progress" if not done else ("incomplete" if finish == "length" and req.max_output_tokens
                                             else "completed")
    output = []
    if done:
        output = [{"type": "message", "id": f"msg_{rid[5:]}", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "model": model,
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
        "output": output, "parallel_tool_calls": False, "previous_response_id": None, "reasoning": None,
        "store": False, "temperature": req.temperature, "top_p": req.top_p, "text": {"format": {"type": "text"}},
        "tool_choice": "none", "tools": [], "truncation": "disabled", "user": req.user,
        "usage": None if usage is None else {
            "input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]},
    }


def new_id() -> tuple[str, int]:
    return f"resp_{secrets.token_hex(12)}", int(time.time())


def from_chat(req: ResponsesRequest, chat: dict[str, Any], model: str) -> dict[str, Any]:
    rid, created = new_id()
    choice = chat["choices"][0]
    return response_object(req, rid, created, choice["message"]["content"], choice["finish_reason"], chat["usage"],
                           model)


async def stream_from_chat(req: ResponsesRequest, chunks: AsyncIterator[str], model: str) -> AsyncIterator[str]:
    """Responses' typed events from a chat completion's stream: created, the message and its
    text part added, a delta per chunk with text, then done events and ``response.completed``.
    An error chunk becomes ``error`` and the stream ends there."""
    rid, created = new_id()
    item = f"msg_{rid[5:]}"
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': sequence - 1, **fields})}\n\n"

    in_progress = response_object(req, rid, created, None, None, None, model)
    yield event("response.created", response=in_progress)
    yield event("response.in_progress", response=in_progress)
    message = {"type": "message", "id": item, "status": "in_progress", "role": "assistant", "content": []}
    yield event("response.output_item.added", output_index=0, item=message)
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.content_part.added", item_id=item, output_index=0, content_index=0, part=part)
    text, finish, usage = "", None, None
    async for raw in chunks:
        if not raw.startswith("data: {"):
            continue
        chunk = json.loads(raw[6:])
        if "error" in chunk:
            yield event("error", code=chunk["error"].get("code"), message=chunk["error"].get("message"), param=None)
            return
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {}).get("content") or ""
            if delta:
                text += delta
                yield event("response.output_text.delta", item_id=item, output_index=0, content_index=0, delta=delta,
                            logprobs=[])
            finish = choice.get("finish_reason") or finish
    yield event("response.output_text.done", item_id=item, output_index=0, content_index=0, text=text, logprobs=[])
    part = {**part, "text": text}
    yield event("response.content_part.done", item_id=item, output_index=0, content_index=0, part=part)
    yield event("response.output_item.done", output_index=0,
                item={**message, "status": "completed", "content": [part]})
    final = response_object(req, rid, created, text, finish, usage, model)
    yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
