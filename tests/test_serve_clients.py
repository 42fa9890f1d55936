"""What OpenAI-compatible clients send (lm-eval's prompt scoring, guidellm's and LangChain's
fields), request bodies as the clients write them, answered by a served tiny export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from samout_edge.runtime.registry import load_runner
from tests.test_serve import client_for  # noqa: F401 - a fixture: a server on a TestClient

pytest.importorskip("fastapi")


@pytest.fixture
def clients(exported, client_for, tmp_path):  # noqa: F811 - the imported fixture
    """Servers of one model as two graphs: every position's logits, and the last one's only."""
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps([chr(i) for i in range(128)]))

    def get(logits: str, arch: str = "cummax", **options):
        return client_for(exported(arch=arch, logits=logits).directory, vocab=vocab, **options)

    return get


def reference_logprobs(directory, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1, from one whole call of a ``--logits all`` export."""
    with load_runner(directory, "ort") as runner:
        logits, _ = runner.run(np.asarray([ids], dtype=np.int64), runner.initial_state(1))
        z = np.asarray(logits, dtype=np.float64)[0]
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.asarray([logp[i - 1, ids[i]] for i in range(1, len(ids))])


def completion(c, **body) -> dict:
    r = c.http.post("/v1/completions", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("logits", ["all", "last"])
def test_lm_eval_scoring_gets_every_prompt_tokens_log_probability(exported, clients, logits):
    """lm-eval's loglikelihood body (echo, logprobs 1, max_tokens 0 or 1, token-id prompts in a
    batch): the first token null, each other one its log-probability after the ones before,
    whatever the graph returns (a last-logits graph is fed a token per call)."""
    c = clients(logits)
    prompts = [[104, 105, 32, 116, 104, 101, 114, 101], [97, 98, 99]]
    for max_tokens in (0, 1):
        body = completion(c, prompt=prompts, echo=True, logprobs=1, max_tokens=max_tokens, seed=1234)
        for prompt, choice in zip(prompts, body["choices"]):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(prompt) + max_tokens == len(lp["token_logprobs"])
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            want = reference_logprobs(exported(logits="all").directory, prompt)
            np.testing.assert_allclose(lp["token_logprobs"][1 : len(prompt)], want, rtol=1e-4, atol=1e-5)
            for got, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
                assert len(top) == 1 and max(top.values()) >= got - 1e-9  # lm-eval's is_greedy reads these
            assert lp["text_offset"] == list(range(len(prompt) + max_tokens))  # one character per token here
            assert choice["token_ids"] == [] if max_tokens == 0 else len(choice["token_ids"]) == 1
        assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_text_prompts_are_scored_and_echoed_with_their_offsets(clients):
    c = clients("all")
    body = completion(c, prompt="def f(x):", echo=True, logprobs=3, max_tokens=2)
    choice = body["choices"][0]
    assert choice["text"].startswith("def f(x):") and len(choice["text"]) == len("def f(x):") + 2
    lp = choice["logprobs"]
    assert lp["tokens"][:9] == list("def f(x):") and len(lp["top_logprobs"][1]) == 3
    assert lp["text_offset"] == list(range(11))


def test_a_session_scores_what_the_request_sent_and_zero_tokens_leave_the_last_pending(clients):
    """max_tokens 0 in a session feeds all but the last token (it stays pending, as a generated
    one does), so the next turn's first token has its log-probability and the text goes on
    exactly as one request of the whole would."""
    c = clients("all")
    sid = c.http.post("/v1/sessions").json()["id"]
    first = completion(c, prompt=[104, 105, 32], echo=True, logprobs=0, max_tokens=0, session=sid)
    assert first["session"]["position"] == 2 and first["choices"][0]["logprobs"]["token_logprobs"][0] is None
    second = completion(c, prompt=[116, 104], echo=True, logprobs=0, max_tokens=4, session=sid)
    lp = second["choices"][0]["logprobs"]["token_logprobs"]
    whole = completion(c, prompt=[104, 105, 32, 116, 104], echo=True, logprobs=0, max_tokens=4)
    want = whole["choices"][0]["logprobs"]["token_logprobs"][3:]
    np.testing.assert_allclose(lp, want, rtol=1e-5)  # the pending token's logits score "t"
    assert second["choices"][0]["token_ids"] == whole["choices"][0]["token_ids"]


def test_a_streamed_echo_carries_the_prompts_log_probabilities(clients):
    c = clients("last")
    with c.http.stream("POST", "/v1/completions", json={"prompt": "abc", "echo": True, "logprobs": 1,
                                                         "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == "abc" and first["logprobs"]["token_logprobs"][0] is None
    assert len(first["logprobs"]["token_logprobs"]) == 3
    whole = completion(c, prompt="abc", echo=True, logprobs=1, max_tokens=3)["choices"][0]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == whole["text"]
    streamed = [v for ch in chunks if ch["choices"][0]["logprobs"] for v in ch["choices"][0]["logprobs"]["text_offset"]]
    assert streamed == whole["logprobs"]["text_offset"]


def test_what_benchmark_clients_send_is_accepted(clients):
    """guidellm's streamed completion (vLLM's ignore_eos, continuous usage), lm-eval's five stop
    strings, LangChain's twenty prompts, the SDK's developer role, store and metadata."""
    c = clients("last")
    with c.http.stream("POST", "/v1/completions", json={
            "prompt": "hi", "max_tokens": 5, "stream": True, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [ch["usage"]["completion_tokens"] for ch in chunks if ch["choices"] and ch["choices"][0]["token_ids"]]
    assert counts == [1, 2, 3, 4, 5]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    stops = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert completion(c, prompt="hi", max_tokens=4, stop=stops)["choices"][0]["finish_reason"] in ("stop", "length")
    body = completion(c, prompt=[f"p{i}" for i in range(20)], max_tokens=2)
    assert [ch["index"] for ch in body["choices"]] == list(range(20))
    chat = c.http.post("/v1/chat/completions", json={
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
        "max_tokens": 3, "temperature": 0, "store": False, "metadata": {"run": "1"}, "top_k": -1,
        "skip_special_tokens": True, "spaces_between_special_tokens": True})
    assert chat.status_code == 200, chat.text
    same = c.http.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"}],
        "max_tokens": 3, "temperature": 0})
    assert chat.json()["choices"][0]["message"] == same.json()["choices"][0]["message"]


def test_usage_comes_once_per_stream(clients):
    """LangChain adds up every chunk's usage: with include_usage only the last chunk has it."""
    c = clients("last")
    with c.http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [ch for ch in chunks if ch.get("usage")] == chunks[-1:]


@pytest.mark.parametrize("body,message", [
    ({"stop": [f"s{i}" for i in range(65)]}, "stop: at most 64 strings, got 65"),
    ({"stop": ["a", ""]}, "stop: stop sequence 1 is empty"),
    ({"stop": 5}, "stop: must be a string or a list of strings"),
    ({"prompt": [[1, 2], "a"]}, "prompt: prompt 1 is not a list of token ids"),
    ({"prompt": []}, "prompt: an empty list"),
    ({"prompt": ["a"] * 33}, "at most 32 sequences (prompts x n) per request"),
    ({"min_tokens": 9}, "min_tokens (9) is above max_tokens (4)"),
    ({"store": True}, "store is not supported"),
    ({"repetition_penalty": 0}, "repetition_penalty: Input should be greater than 0"),
    ({"guided_json": {}}, "unsupported parameter: guided_json"),
])
def test_every_limit_is_named(clients, body, message):
    c = clients("last")
    r = c.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_a_non_text_content_part_is_refused_by_its_type(clients):
    c = clients("last")
    r = c.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert r.status_code == 400 and "part 1 is a 'image_url' part" in r.json()["error"]["message"], r.text


def test_min_tokens_holds_stop_sequences_off_and_repetition_penalty_changes_greedy_text(clients):
    c = clients("last")
    full = completion(c, prompt="hi", max_tokens=30)["choices"][0]["text"]
    stop = full[2]
    early = completion(c, prompt="hi", max_tokens=30, stop=[stop])["choices"][0]
    late = completion(c, prompt="hi", max_tokens=30, stop=[stop], min_tokens=10)["choices"][0]
    assert len(early["token_ids"]) <= 3 and len(late["token_ids"]) >= 10
    assert stop not in late["text"][9:] and late["text"] == full[: len(late["text"])]
    penalised = completion(c, prompt="hi", max_tokens=30, repetition_penalty=5.0)["choices"][0]["text"]
    assert penalised != full


def test_the_openai_sdks_responses_api_and_developer_messages(clients):
    """The SDK's newer entry point, unchanged: responses.create, streamed and not."""
    openai = pytest.importorskip("openai")
    c = clients("last")
    sdk = openai.OpenAI(base_url=str(c.http.base_url) + "/v1", api_key="unused", http_client=c.http)
    chat = sdk.chat.completions.create(model="m", messages=[{"role": "developer", "content": "be brief"},
                                                            {"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0, store=False, metadata={"k": "v"})
    response = sdk.responses.create(model="m", instructions="be brief", input="hi", max_output_tokens=4,
                                    temperature=0, store=False)
    assert response.status == "incomplete" and response.output_text == chat.choices[0].message.content
    assert response.usage.output_tokens == 4 and response.usage.input_tokens == chat.usage.prompt_tokens
    events = list(sdk.responses.create(model="m", instructions="be brief", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}], max_output_tokens=4, temperature=0, store=False, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == response.output_text and events[-1].type == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        sdk.responses.create(model="m", input="hi", previous_response_id="resp_1", store=False)


@pytest.mark.parametrize("logits", ["all", "last"])
def test_a_prompt_longer_than_max_seq_is_scored_whole(exported, clients, logits):
    """600 tokens through a max_seq 300 graph: calls of 300 with the state carried, and more rows
    than are log-softmaxed at once; the same numbers as one float64 pass over the whole."""
    c = clients(logits)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 128, 600).tolist()
    body = completion(c, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    got = body["choices"][0]["logprobs"]["token_logprobs"]
    with load_runner(exported(logits="all").directory, "ort") as runner:
        z, _ = runner.run(np.asarray([prompt], dtype=np.int64), runner.initial_state(1))  # chunked by the runner
    z = np.asarray(z, dtype=np.float64)[0]
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got[1:], [logp[i - 1, prompt[i]] for i in range(1, 600)], rtol=1e-4, atol=1e-5)
