"""vLLM's tokenizer endpoints, for clients that tokenize through the server.

lm-evaluation-harness's ``remote`` tokenizer backend probes ``GET /tokenizer_info`` (it
needs the key ``eos_token`` there, a value or null) and then encodes with ``POST /tokenize``
(``{"prompt", "add_special_tokens": false}`` -> ``tokens``) and decodes with ``POST
/detokenize`` (``tokens`` -> ``prompt``). The bodies are vLLM's (vllm/entrypoints/serve/
tokenize/protocol.py): TokenizeCompletionRequest ``{model, prompt, add_special_tokens (default
true), return_token_strs}`` or TokenizeChatRequest ``{model, messages, add_generation_prompt,
continue_final_message, add_special_tokens (default false), return_token_strs}`` ->
``{count, max_model_len, tokens, token_strs}``; DetokenizeRequest ``{model, tokens}`` ->
``{prompt}``; /tokenizer_info: the export's tokenizer_config.json with ``tokenizer_class``,
the special tokens and the chat template.

``/tokenize`` answers what ``AutoTokenizer.from_pretrained(EXPORT)(text,
add_special_tokens=...)`` gives, which is what a completion with the same
``add_special_tokens`` feeds the model (a completion's default is false, vLLM's /tokenize
default true); bytes and string lists have no special tokens to add. Every limit is the
completions' own (``Server.prompt_ids``): characters and tokens of a prompt, ids inside
the vocabulary.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
)

from samout_edge.artifact.tokenizer_files import TOKENIZER_CLASS, TokenizerForm, token_strings, tokenizer_form
from samout_edge.artifact.vocab import ByteVocab, HFTokenizer, Vocab
from samout_edge.serve.errors import ApiError, unsupported
from samout_edge.serve.protocol import MAX_CHAT_MESSAGES, ChatMessage, check_messages, few_messages
from samout_edge.serve.server import Server, prompt_too_long
from samout_edge.serve.template import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS

# transformers' tag for continue_final_message: appended to the last message, found in the render, cut there
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# what /tokenizer_info always names, null when the tokenizer has none (lm-eval's remote backend needs eos_token)
INFO_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizeCompletionRequest(BaseModel):
    """vLLM's /tokenize request for one text."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # vLLM's default (a completion's is false)
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    """vLLM's /tokenize request for a conversation, rendered by the server's chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: Annotated[list[ChatMessage], BeforeValidator(few_messages), Field(max_length=MAX_CHAT_MESSAGES)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    # vLLM's, not implemented: the operator's template is the one this server renders
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> str | None:
        for name in ("chat_template", "chat_template_kwargs", "tools"):
            if getattr(self, name):
                return name
        return None


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize request."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[StrictInt]


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what it is instead."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError("the body is not valid JSON", 400, "invalid_request") from None
    if not isinstance(data, dict):
        raise ApiError("the body must be a JSON object", 400, "invalid_request")
    return data


def validated(form: type[BaseModel], data: dict[str, Any]) -> Any:
    """``data`` as ``form``; a 400 naming the first bad field, as FastAPI's own bodies get."""
    try:
        return form.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def parse_tokenize(body: bytes) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """The chat form when the body has ``messages``, else the text form: validated as one model,
    so an error names that model's field (a union would report both forms' errors)."""
    data = json_object(body)
    return validated(TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest, data)


_forms: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # server -> (its vocab, that vocab's form)


def form_of(server: Server) -> TokenizerForm:
    """The server's vocab as the export's tokenizer files state it (computed once per vocab)."""
    vocab = need_vocab(server)
    cached = _forms.get(server)
    if cached is None or cached[0] is not vocab:
        cached = (vocab, tokenizer_form(vocab))
        _forms[server] = cached
    return cached[1]


def need_vocab(server: Server) -> Vocab | ByteVocab | HFTokenizer:
    if server.vocab is None:
        raise ApiError("this server has no vocab (serve --vocab FILE): it cannot tokenize text", 400, "no_vocab")
    return server.vocab


def max_model_len(server: Server) -> int:
    """vLLM's max_model_len: the longest prompt this server takes (--max-prompt-tokens; an engine's
    profiles may hold less). A client that keeps prompt + max_tokens within it, as lm-eval's
    max_length and vLLM clients do, is never refused for length; cummax itself takes any."""
    limit = server.options.max_prompt_tokens
    context = server.info.max_context
    return limit if context is None else min(limit, context)


def render_chat(server: Server, messages: list[dict[str, Any]], add_generation_prompt: bool,
                continue_final: bool) -> str:
    """The conversation through the server's chat template, as transformers' apply_chat_template
    renders it: with ``continue_final`` the text ends where the last message's content ends
    (a tag appended to it marks the place), so the model continues that message. Blocking."""
    template = server.chat_template
    if not continue_final:
        return template.render(messages, add_generation_prompt)
    if not messages:
        raise ApiError("continue_final_message: there is no message to continue", 400, "invalid_request")
    if "content" not in (template.source or DEFAULT_CHAT_TEMPLATE):
        raise ApiError("continue_final_message: the chat template does not read a message's content", 400,
                       "chat_template")
    final = messages[-1]["content"]
    rendered = template.render([*messages[:-1], {**messages[-1], "content": final + CONTINUE_TAG}], False)
    tag = CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ApiError("continue_final_message: the chat template's text does not hold the final message as "
                       "sent", 400, "chat_template")
    at = rendered.rindex(tag)
    return rendered[:at] if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else rendered[:at].rstrip()


async def tokenize(server: Server, body: bytes) -> dict[str, Any]:
    """POST /tokenize: a text's or a conversation's ids (and their token strings)."""
    req = parse_tokenize(body)
    vocab = need_vocab(server)
    if isinstance(req, TokenizeChatRequest):
        refused = req.unsupported()
        if refused is not None:
            raise unsupported(refused, "the server's chat template renders; leave it out")
        if req.continue_final_message and req.add_generation_prompt:
            raise ApiError("continue_final_message and add_generation_prompt cannot both be true (send "
                           "add_generation_prompt: false)", 400, "invalid_request")
        check_messages(req.messages)
        messages = [m.for_template() for m in req.messages]  # as chat completions give them to the template
        text = await server.render(render_chat, server, messages, req.add_generation_prompt,
                                   req.continue_final_message)
    else:
        text = req.prompt
    # the completions' encoding and limits, off the event loop
    ids = await asyncio.to_thread(server.prompt_ids, text, req.add_special_tokens)
    limit = server.options.max_prompt_tokens
    if len(ids) > limit:  # prompt_ids refuses what is surely too long; a completion counts the rest, as here
        raise prompt_too_long(len(ids), limit)
    strs = None
    if req.return_token_strs:
        form = await asyncio.to_thread(form_of, server)
        strs = token_strings(form, vocab, ids)
    return {"count": len(ids), "max_model_len": max_model_len(server), "tokens": ids, "token_strs": strs}


async def detokenize(server: Server, body: bytes) -> dict[str, Any]:
    """POST /detokenize: the text of ids, as a completion's text is decoded."""
    req = validated(DetokenizeRequest, json_object(body))
    vocab = need_vocab(server)
    limit = server.options.max_prompt_tokens
    if len(req.tokens) > limit:
        raise ApiError(f"tokens: {len(req.tokens):,} ids, above this server's limit of {limit:,} "
                       "(serve --max-prompt-tokens)", 400, "prompt_too_long")
    try:
        ids = server.prompt_ids(req.tokens)  # every id inside the model's vocabulary
    except ApiError as e:
        raise ApiError(f"tokens: {e}", e.status, e.code) from None
    beyond = next((t for t in ids if t >= vocab.size), None)
    if beyond is not None:
        raise ApiError(f"tokens: token id {beyond} has no token in this server's vocab (0..{vocab.size - 1})", 400,
                       "token_out_of_range")
    return {"prompt": await asyncio.to_thread(vocab.decode_ids, ids)}


async def tokenizer_info(server: Server) -> dict[str, Any]:
    """GET /tokenizer_info: the export's tokenizer_config.json as vLLM reports a tokenizer's, the
    special tokens (null where there are none; an operator's tokenizer_config.json given to
    --chat-template names them) and the chat template this server renders."""
    vocab = need_vocab(server)
    form = await asyncio.to_thread(form_of, server)
    named = server.chat_template.variables
    info: dict[str, Any] = {**form.config, **{name: named.get(name) for name in INFO_TOKENS},
                            **{name: named[name] for name in SPECIAL_TOKENS if name in named}}
    info["tokenizer_class"] = TOKENIZER_CLASS if form.tokenizer is not None else None
    info["chat_template"] = server.chat_template.source or DEFAULT_CHAT_TEMPLATE
    info["vocab_kind"] = vocab.kind  # ours: "utf-8 bytes", "strings" or "huggingface"
    if form.reason:
        info["tokenizer_files"] = form.note()  # ours: why AutoTokenizer has no form of this vocab
    return info
