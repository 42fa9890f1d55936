"""What a request may say: OpenAI's completion and chat completion bodies, as pydantic models.

``Sampling`` holds the fields both share (how to sample, when to stop, how to answer, vLLM's
extensions, our ``session``); ``CompletionRequest`` adds the prompt (a text, token ids, or a
list of either), ``ChatRequest`` the messages, which the chat template renders into a
completion's prompt (``ChatRequest.completion``). Limits that must hold before a body is
validated item by item (prompts, messages, stop strings) are checked by the validators here;
limits that depend on the server (``--max-tokens``, the vocab, the batch) by serve/app.py.
A field OpenAI has and this server does not do is accepted only at the value that asks for
nothing (``unsupported`` names it); a field OpenAI does not have is refused: never silence.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from samout_edge.artifact.vocab import check_text
from samout_edge.errors import SamoutError
from samout_edge.serve.errors import ApiError

DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 4096  # prompts in one request, counted before they are validated; one batch (--max-batch) decides
MAX_STOPS = 64  # stop strings a request may give (vLLM takes any number; each is matched on every token's text)
MAX_STOP_CHARS = 1024  # one stop string: a stream holds back text as long as the longest, minus one
MAX_CHAT_MESSAGES = 4096  # a chat request's messages: each is validated and rendered on its way to a prompt


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


def _stop_strings(value: Any) -> Any:
    """``stop``: a string or a list of them, each limit named (a client's list is refused whole,
    never cut)."""
    if value is None or isinstance(value, str):
        value = [] if value is None else [value]
    elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a string or a list of strings")
    if len(value) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} strings, got {len(value)}")
    for i, v in enumerate(value):
        if not v:
            raise ValueError(f"stop sequence {i} is empty")
        if len(v) > MAX_STOP_CHARS:
            raise ValueError(f"stop sequence {i} is {len(v):,} characters, above the limit of {MAX_STOP_CHARS:,}")
    return value


def _prompt_list(value: Any) -> Any:
    """``prompt``: a text, token ids, or a list of either (not mixed); counted before each is
    validated, so a body of a million prompts costs no more than its parse."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string, a list of token ids, or a list of strings or of token-id lists")
    if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    if not value:
        raise ValueError("an empty list: send at least one prompt (an empty string is an empty prompt)")
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS:,} prompts per request (and what one batch holds), got {len(value):,}")
    if all(isinstance(v, str) for v in value):
        return value
    for i, v in enumerate(value):
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise ValueError(f"prompt {i} is not a list of token ids (a list of prompts holds strings or id lists, "
                             "one kind)")
    return value


class Sampling(BaseModel):
    """The fields completions and chat completions share: how to sample, when to stop, how
    to answer. Every field is honoured; OpenAI's fields this server does not implement are
    accepted only at the value that asks for nothing (``unsupported`` names any other), and
    a field OpenAI does not have is refused: never silence."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: StrictInt = Field(0, ge=-1)  # 0 or vLLM's -1: no cut
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    stop: Annotated[list[str], BeforeValidator(_stop_strings)] = Field(default_factory=list)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    n: StrictInt = Field(1, ge=1)  # prompts x n: what one batch holds (serve --max-batch), checked per server
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the end user, for the operator's records: it changes no output
    # OpenAI's: this server keeps no completions (store true is refused); metadata is for the operator's records
    store: bool | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    # vLLM's extensions, as benchmark and eval clients send them (docs.vllm.ai, "Extra parameters")
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)  # > 1 discourages the context's tokens
    min_tokens: StrictInt = Field(0, ge=0)  # stop sequences end nothing before this many tokens
    ignore_eos: bool = False  # no vocab here has an end-of-sequence token that stops generation: either value
    skip_special_tokens: bool = True  # a Hugging Face tokenizer's special tokens are left out of the text
    spaces_between_special_tokens: bool = True  # a slow tokenizer's; a fast tokenizer's decoding ignores it
    add_special_tokens: bool = False  # the tokenizer's BOS/EOS around a text prompt (Hugging Face tokenizers)
    session: str | None = None  # ours: continue a server-side session
    # ours: the session's position as the client last saw it; a request whose answer was lost (kill -9,
    # a dropped connection) sent again with it gets the committed answer back instead of a second turn
    expected_position: StrictInt | None = Field(None, ge=0)

    def digest(self) -> str:
        """What makes two requests the same turn: every field but how the answer is delivered."""
        fields = self.model_dump(exclude={"stream", "stream_options", "expected_position"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def unsupported_common(self) -> str | None:
        if self.store:
            return "store"  # this server keeps no completions to list or distil
        if self.min_tokens and self.min_tokens > self.limit():
            raise ApiError(f"min_tokens ({self.min_tokens}) is above max_tokens ({self.limit()})", 400,
                           "invalid_request")
        return None

    def limit(self) -> int:
        return DEFAULT_MAX_TOKENS


class CompletionRequest(Sampling):
    """OpenAI's completion request."""

    # one prompt (text or token ids), or a list of them: choice i * n + j is prompt i's j-th
    prompt: Annotated[str | list[StrictInt] | list[str] | list[list[StrictInt]], BeforeValidator(_prompt_list)] = ""
    max_tokens: StrictInt = Field(DEFAULT_MAX_TOKENS, ge=0)  # 0: only the prompt (with echo and logprobs: scored)
    best_of: StrictInt | None = None  # only = n: we return every sequence we make
    echo: bool = False  # the prompt's text before the completion's
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # each token's log-probability and the top ones
    # OpenAI's, not implemented: refused unless at the value that asks for nothing
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int):
            return list(self.prompt)
        return [self.prompt]

    def limit(self) -> int:
        return self.max_tokens

    def unsupported(self) -> str | None:
        """The first parameter set to something this server does not do."""
        for name, idle in (("logit_bias", {}), ("suffix", None)):
            value = getattr(self, name)
            if value is not None and value != idle:
                return name
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"  # best_of > n: sequences made and thrown away; we return all we make
        return self.unsupported_common()

    def stops(self) -> list[str]:
        return list(self.stop)


def _content_text(value: Any) -> Any:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are
    read (joined by newlines, as vLLM joins them); any other part is refused by its type."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            what = f"a {kind!r} part" if isinstance(kind, str) else "not a content part"
            raise ValueError(f"part {i} is {what}: this server reads only {{\"type\": \"text\", \"text\": ...}} "
                             "parts (the model reads text)")
        texts.append(part["text"])
    return "\n".join(texts)


def few_messages(messages: Any) -> Any:
    """Chat messages counted before each is validated: validating 200,000 of them holds the event loop for seconds."""
    if isinstance(messages, list) and len(messages) > MAX_CHAT_MESSAGES:
        raise ValueError(f"{len(messages):,} messages, above this server's limit of {MAX_CHAT_MESSAGES:,}")
    return messages


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Annotated[str, BeforeValidator(_content_text)] = ""
    name: str | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        if self.role == "developer":
            message["role"] = "system"
        return message


class ChatRequest(Sampling):
    """OpenAI's chat completion request: the messages go through the chat template into a
    completion's prompt; tools and every other unimplemented field are refused by name."""

    messages: Annotated[list[ChatMessage], BeforeValidator(few_messages),
                        Field(min_length=1, max_length=MAX_CHAT_MESSAGES)]
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: bool | None = None  # each token's log-probability (with its bytes), as OpenAI's chat answers
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)  # and this many most likely, with logprobs
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def unsupported(self) -> str | None:
        if self.tools or self.functions or self.tool_choice not in (None, "none") or \
                self.function_call not in (None, "none"):
            return "tools"  # tool calls: the model has no tool-call format
        for name, idle in (("logit_bias", {}), ("parallel_tool_calls", None)):
            value = getattr(self, name)
            if value is not None and value != idle:
                return name
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        return self.unsupported_common()

    def completion(self, prompt: str) -> CompletionRequest:
        """The completion this chat turn is: the shared fields, the rendered prompt."""
        if self.top_logprobs and not self.logprobs:
            raise ApiError("top_logprobs needs logprobs: true", 400, "invalid_request")
        req = CompletionRequest(prompt=prompt, max_tokens=self.limit(),
                                **{k: getattr(self, k) for k in Sampling.model_fields})
        req.logprobs = (self.top_logprobs or 0) if self.logprobs else None  # chat takes up to 20, completions 5
        return req



def check_messages(messages: list[ChatMessage]) -> None:
    """Refuse a message that is not valid Unicode (a lone surrogate), naming it."""
    for i, m in enumerate(messages):
        try:
            check_text(m.content)
        except SamoutError as e:
            raise ApiError(f"messages.{i}.content: {e}", 400, "invalid_text") from None


def validation_message(errors: list[dict[str, Any]]) -> str:
    """pydantic's errors as one line: the first one, where it is, in our validators' words."""
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "extra_forbidden":
        return f"unsupported parameter: {where} (not a field of this OpenAI request that this server knows)"
    message = str(first.get("msg")).removeprefix("Value error, ")  # our validators' own one-line messages
    return f"{where}: {message}" if where else message

