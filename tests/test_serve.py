"""The OpenAI-compatible server: the official client talks to it unchanged, exits equal the library's, refusals."""

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from earlyexit.errors import EarlyExitError
from earlyexit.model import EarlyExitHead
from earlyexit.serve import ChatModel, check_exposure, first_stop, make_server
from commands import refusal, refusal_process
from tiny import EOS, PAD, char_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def start(chat: ChatModel, token: str | None = None):
    server = make_server(chat, "127.0.0.1", 0, token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def chat():
    lm = tiny_model("llama")
    lm.generation_config.eos_token_id, lm.generation_config.pad_token_id = EOS, PAD
    return ChatModel(lm, char_tokenizer(), "tiny", max_tokens=16)


@pytest.fixture(scope="module")
def server(chat):
    server = start(chat)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(server):
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def library_answer(chat: ChatModel, layer: int, max_tokens: int) -> str:
    """What the library itself generates at ``layer`` for MESSAGES (greedy)."""
    ids = torch.tensor([chat.encode(MESSAGES)])
    out = EarlyExitHead(chat.ee.lm).generate(ids, torch.ones_like(ids), layer, max_new_tokens=max_tokens, pad_token_id=PAD)
    return chat.tokenizer.decode(out.tokens[0, : int(out.n_tokens[0])].tolist(), skip_special_tokens=True)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["n_layers"] == 4


@pytest.mark.parametrize("layer", [1, 2, 3, 4])
def test_exit_layer_through_the_server_equals_the_library(client, chat, layer):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12,
                                           extra_body={"exit_layer": layer})
    assert reply.choices[0].message.content == library_answer(chat, layer, 12)
    assert reply.model_extra["exit_layer"] == layer
    assert reply.usage.prompt_tokens == len(chat.encode(MESSAGES)) and reply.usage.completion_tokens <= 12
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_default_exit_is_the_full_model(client, chat):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=10)
    assert reply.model_extra["exit_layer"] == 4
    assert reply.choices[0].message.content == library_answer(chat, 4, 10)


def test_streaming_sends_the_same_text(client):
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=12, extra_body={"exit_layer": 3})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_cut_the_answer(client, chat):
    full = library_answer(chat, 4, 16)
    stop = full[5:7]
    cut = full[: full.find(stop)]
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=16, stop=[stop])
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == cut


def test_stop_counts_only_the_tokens_up_to_the_stop(client, chat):
    full = library_answer(chat, 4, 16)
    stop = full[5:7]
    # the character tokenizer: one token per character, so the answer ends with the stop string's last token
    expected = full.find(stop) + len(stop)
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=16, stop=[stop])
    assert client.chat.completions.create(**kwargs).usage.completion_tokens == expected
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].usage.completion_tokens == expected


def test_streaming_goes_token_by_token_even_without_spaces(client, chat):
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=0, max_tokens=16, extra_body={"exit_layer": 4})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(stream=True, **kwargs)
              if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole and len(whole) >= 8
    assert all(len(p) == 1 for p in pieces)  # one character token per event, never the whole answer at once


def test_tokens_to_stop_is_the_shortest_prefix_holding_the_stop():
    from earlyexit.serve import tokens_to_stop

    tok = char_tokenizer()
    ids = tok("abcdefgh", add_special_tokens=False)["input_ids"]
    assert tokens_to_stop(tok, ids, ["de"]) == 5 and tokens_to_stop(tok, ids, ["a"]) == 1
    assert tokens_to_stop(tok, ids, ["gh", "cd"]) == 4


def test_a_bad_content_length_is_a_400_not_a_500(server, caplog):
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", "abc")
    conn.endheaders()
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    assert response.status == 400 and "Content-Length must be a non-negative integer" in payload["error"]["message"]
    assert "Traceback" not in caplog.text and "request failed" not in caplog.text


def test_sampling_with_a_seed_repeats(client):
    kwargs = dict(model="tiny", messages=MESSAGES, temperature=1.0, seed=7, max_tokens=12, extra_body={"exit_layer": 2})
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "other", "messages": MESSAGES}, 404, "model 'other' is not served here"),
    ({"model": "tiny", "messages": MESSAGES, "exit_layer": 0}, 400, "exit_layer must be an integer in 1..4"),
    ({"model": "tiny", "messages": MESSAGES, "exit_layer": 5}, 400, "exit_layer must be an integer in 1..4"),
    ({"model": "tiny", "messages": MESSAGES, "exit_layer": "2"}, 400, "exit_layer must be an integer"),
    ({"model": "tiny", "messages": []}, 400, "messages must be a non-empty list"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "needs a role"),
    ({"model": "tiny", "messages": MESSAGES, "n": 2}, 400, "only n=1"),
    ({"model": "tiny", "messages": MESSAGES, "temperature": 3}, 400, "temperature must be a number in [0, 2]"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 250}, 400, "exceed the model's context window of 256"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens must be an integer in 1..4096, got 0"),
    ({"model": "tiny", "messages": MESSAGES, "max_completion_tokens": 0}, 400, "max_tokens must be an integer in 1..4096, got 0"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    code, payload = post(server.url + "/chat/completions", json.dumps(body).encode())
    assert code == status and needle in payload["error"]["message"], payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}


def test_malformed_body_and_unknown_route(server):
    assert post(server.url + "/chat/completions", b"{nope")[0] == 400
    assert post(server.url + "/completions", b"{}")[0] == 404


def test_bearer_token(chat):
    server = start(chat, token="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).choices
    finally:
        server.shutdown()
        server.server_close()


def test_non_loopback_needs_a_token_or_an_explicit_allowance():
    check_exposure("127.0.0.1", None, False)
    check_exposure("::1", None, False)
    check_exposure("0.0.0.0", "token", False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(EarlyExitError, match="refusing to serve on '0.0.0.0' without a bearer token"):
        check_exposure("0.0.0.0", None, False)


def test_first_stop():
    assert first_stop("abcdef", ["de", "b"]) == 1 and first_stop("abc", ["x"]) is None and first_stop("abc", []) is None


@pytest.mark.parametrize("extra,message", [
    (["--server.host", "0.0.0.0"], "refusing to serve on '0.0.0.0' without a bearer token"),
    (["--server.token_env", "EARLYEXIT_NO_SUCH_TOKEN"], "the environment variable EARLYEXIT_NO_SUCH_TOKEN is not set"),
    (["--server.port", "70000"], "server.port = 70000 is out of range: it must be in 0..65535"),
    (["--server.max_tokens", "0"], "server.max_tokens = 0 is out of range"),
])
def test_cli_refusals(tiny_dir, extra, message, monkeypatch, capsys):
    monkeypatch.delenv("EARLYEXIT_NO_SUCH_TOKEN", raising=False)
    assert message in refusal("serve", ["--model.name", tiny_dir, *extra], monkeypatch, capsys)


def test_cli_refusal_in_a_real_process(tiny_dir):
    last = refusal_process("earlyexit.serve", ["--model.name", tiny_dir, "--server.port", "70000"])
    assert "server.port = 70000 is out of range: it must be in 0..65535" in last


def test_cli_serves_a_model_directory(tiny_dir):
    proc = subprocess.Popen([sys.executable, "-m", "earlyexit.serve", "--model.name", tiny_dir, "--server.served_name", "t",
                             "--server.port", "0", "--model.device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving t (4 layers) at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split(";")[0]
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="t", messages=MESSAGES, temperature=0, max_tokens=4, extra_body={"exit_layer": 1})
        assert reply.model_extra["exit_layer"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.integration
def test_smollm2_exit_through_the_openai_client(smollm2):
    lm, tokenizer = smollm2
    chat = ChatModel(lm, tokenizer, "smollm2-135m-instruct")
    server = start(chat)
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    try:
        for layer in (15, 30):
            reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=MESSAGES, temperature=0, max_tokens=12,
                                                   extra_body={"exit_layer": layer})
            ids = torch.tensor([chat.encode(MESSAGES)])
            out = chat.ee.generate(ids, torch.ones_like(ids), layer, max_new_tokens=12)
            expected = tokenizer.decode(out.tokens[0, : int(out.n_tokens[0])].tolist(), skip_special_tokens=True)
            assert reply.choices[0].message.content == expected
    finally:
        client.close()
        server.shutdown()
        server.server_close()


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
