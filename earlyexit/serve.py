"""An OpenAI-compatible HTTP server for early-exit models: ``/v1/chat/completions`` and ``/v1/models``.

Any OpenAI client can talk to any model this package loads (an HF id or directory, the embedded SmolLM2,
optionally with a LoRA adapter). The extension field ``exit_layer`` (1..N, default N: the full model)
picks the exit: only blocks 1..L run, exactly as :meth:`earlyexit.model.EarlyExitHead.generate`.

    python -m earlyexit.serve --model.name smollm2-135m-instruct --server.port 8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m-instruct", messages=[...], extra_body={"exit_layer": 15})

Sampling follows the OpenAI API: ``temperature`` 0 is greedy decoding, otherwise sampling (``top_p``,
``seed``); ``stop`` strings cut the answer; ``stream`` sends server-sent events as tokens are decoded.
Requests are served one at a time (one model, one lock). The server listens on the loopback interface
unless told otherwise; another address needs a bearer token (``--server.token_env``) or
``--server.allow_unauthenticated``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import torch

from earlyexit.context import Context, fit_prompts, window_of
from earlyexit.errors import EarlyExitError, positive, report_errors, require
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs
from earlyexit.data import encode_chat
from earlyexit.model import EarlyExitHead
from earlyexit.network import is_loopback

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant")


class RequestError(Exception):
    """A bad request: answered with an OpenAI-style error body and ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated chat-completions request: the prompt, the exit, and OpenAI's sampling fields mapped onto the
    library's one set of decoding options (``temperature`` 0 is greedy)."""

    input_ids: list[int]
    exit_layer: int
    generation: GenerationArgs
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False


@dataclass
class Completion:
    """One answer: its text (cut at a stop string), token counts and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    exit_layer: int


class ChatModel:
    """One loaded model behind a lock: turns chat requests into early-exit generations.

    Args:
        lm: the causal LM (optionally peft-wrapped).
        tokenizer: its tokenizer; its chat template renders the messages (a plain ``role: text`` transcript without one).
        name: the model name clients send and ``/v1/models`` lists.
        max_tokens: answer length when a request gives none.
        max_tokens_limit: the most tokens a request may ask for.
        context: a prompt that does not fit the model's window with its max_tokens: ``refuse`` (400) or ``truncate``
            (its last tokens kept; the server's log says how many were dropped).
    """

    def __init__(self, lm, tokenizer, name: str, max_tokens: int = 256, max_tokens_limit: int = 4096,
                 context: Context = "refuse"):
        self.ee = EarlyExitHead(lm)
        self.tokenizer = tokenizer
        self.name = name
        self.max_tokens, self.max_tokens_limit = max_tokens, max_tokens_limit
        self.context = context
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.device = next(lm.parameters()).device

    def info(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "earlyexit",
                "n_layers": self.ee.n_layers}

    # --- validation -----------------------------------------------------------------------------------

    def parse(self, body) -> ChatRequest:
        """Validate a request body; every problem is a :class:`RequestError` naming the field."""
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        if body.get("model") != self.name:
            raise RequestError(404, f"model {body.get('model')!r} is not served here; this server serves {self.name!r}",
                               "model", "model_not_found")
        if body.get("n", 1) != 1:
            raise RequestError(400, "only n=1 is supported", "n")
        n_layers = self.ee.n_layers
        layer = body.get("exit_layer", n_layers)
        if layer is None:
            layer = n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n_layers:
            raise RequestError(400, f"exit_layer must be an integer in 1..{n_layers}, got {layer!r}", "exit_layer")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:  # only an absent value means the default; 0 is a bad value like any other
            max_tokens = self.max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.max_tokens_limit:
            raise RequestError(400, f"max_tokens must be an integer in 1..{self.max_tokens_limit}, got {max_tokens!r}", "max_tokens")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise RequestError(400, "top_p must be above 0", "top_p")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(400, f"seed must be an integer, got {seed!r}", "seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "stream must be true or false", "stream")
        input_ids = self.encode(body.get("messages"))
        window = window_of(self.ee.config)
        if window and len(input_ids) + max_tokens > window:
            if self.context == "refuse" or max_tokens >= window:
                raise RequestError(400, f"{len(input_ids)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                                        f"context window of {window} tokens", "messages", "context_length_exceeded")
            (input_ids,) = fit_prompts([input_ids], window, max_tokens, "truncate", "request prompt", "server.context")
        generation = GenerationArgs(max_new_tokens=max_tokens, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else 1.0, top_p=top_p)
        return ChatRequest(input_ids, layer, generation, seed, stop, stream)

    def encode(self, messages) -> list[int]:
        """Prompt token ids of ``messages``, rendered with the tokenizer's chat template."""
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages must be a non-empty list", "messages")
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise RequestError(400, f"messages[{i}] needs a role in {', '.join(ROLES)}", f"messages[{i}].role")
            content = message.get("content")
            if isinstance(content, list):  # content parts: only text is understood
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise RequestError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise RequestError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
            role = "system" if message["role"] == "developer" else message["role"]
            turns.append({"role": role, "content": content})
        return encode_chat(turns, self.tokenizer)

    # --- generation -----------------------------------------------------------------------------------

    def complete(self, request: ChatRequest, on_text: Callable[[str], None] | None = None) -> Completion:
        """Generate one answer; with ``on_text``, text pieces are passed on as they are decoded (streaming)."""
        if on_text is None:
            out = self._generate(request)
            n = int(out.n_tokens[0])
            tokens = out.tokens[0, :n].tolist()
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = first_stop(text, request.stop)
            if cut is not None:  # the answer ends with the token that completed the stop string
                n = tokens_to_stop(self.tokenizer, tokens, request.stop)
            return Completion(text if cut is None else text[:cut], len(request.input_ids), n,
                              "stop" if cut is not None or bool(out.finished[0]) else "length", request.exit_layer)
        return self._stream(request, on_text)

    def _generate(self, request: ChatRequest, streamer=None):
        ids = torch.tensor([request.input_ids], device=self.device)
        with self.lock:
            if request.generation.do_sample:
                torch.manual_seed(request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little"))
            return self.ee.generate(ids, torch.ones_like(ids), request.exit_layer, request.generation,
                                    pad_token_id=self.tokenizer.pad_token_id, streamer=streamer)

    def _stream(self, request: ChatRequest, on_text: Callable[[str], None]) -> Completion:
        streamer = TokenStreamer(self.tokenizer)
        result = {}

        def work():
            try:
                result["out"] = self._generate(request, streamer)
            except BaseException as err:  # surfaced below, in the request's thread
                result["error"] = err
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        # Text that could still become the start of a stop string is held back until it cannot.
        hold = max((len(s) for s in request.stop), default=1) - 1
        text, sent, stopped, n_stop = "", 0, False, 0
        for text, n_tokens in streamer:
            cut = first_stop(text, request.stop)
            if cut is not None:
                text, stopped, n_stop = text[:cut], True, n_tokens
            ready = len(text) if stopped else len(text) - hold
            if ready > sent:
                on_text(text[sent:ready])
                sent = ready
            if stopped:
                break
        worker.join()
        if "error" in result:
            raise result["error"]
        if len(text) > sent:
            on_text(text[sent:])
        out = result["out"]
        n = n_stop if stopped else int(out.n_tokens[0])
        return Completion(text, len(request.input_ids), n, "stop" if stopped or bool(out.finished[0]) else "length",
                          request.exit_layer)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(400, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


class TokenStreamer:
    """The answer's text after every generated token, as ``(text so far, tokens so far)`` pairs (HF ``streamer``
    protocol: ``put`` / ``end``). HF's ``TextIteratorStreamer`` waits for a space before it lets text go, so an
    answer without spaces arrived in one piece; here each token's text goes at once, unless it ends inside a
    multi-byte character (then it waits for the next token)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.queue, self.prompt_seen = tokenizer, [], queue.Queue(), False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call carries the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.queue.put((text, len(self.tokens)))

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get()) is not None:
            yield item


def tokens_to_stop(tokenizer, tokens: list[int], stops: list[str]) -> int:
    """The fewest leading ``tokens`` whose text holds a stop string: what a server that stops there generated."""
    low, high = 1, len(tokens)
    while low < high:  # the text of a longer prefix extends a shorter one's, so a stop, once in, stays in
        mid = (low + high) // 2
        if first_stop(tokenizer.decode(tokens[:mid], skip_special_tokens=True), stops) is None:
            low = mid + 1
        else:
            high = mid
    return low


def first_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class Server(ThreadingHTTPServer):
    """The HTTP server: a :class:`ChatModel` and an optional bearer token."""

    daemon_threads = True

    def __init__(self, chat: ChatModel, host: str, port: int, token: str | None = None, max_body_bytes: int = 1_000_000):
        self.chat, self.token, self.max_body_bytes = chat, token, max_body_bytes
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._dispatch({"/v1/models": self._models, "/health": lambda: self._json(200, {"status": "ok"})})

    def do_POST(self):
        self._dispatch({"/v1/chat/completions": self._chat})

    def _dispatch(self, routes: dict) -> None:
        try:
            route = routes.get(self.path.split("?")[0].rstrip("/"))
            if route is None:
                raise RequestError(404, f"no route {self.command} {self.path}")
            if self.path != "/health":
                self._authorize()
            route()
        except RequestError as err:
            self._json(err.status, err.body())
        except Exception as err:  # never leave a client waiting; the traceback goes to the log
            log.exception("request failed")
            self._json(500, {"error": {"message": f"internal error: {type(err).__name__}: {err}", "type": "server_error",
                                       "param": None, "code": None}})

    def _authorize(self) -> None:
        token = self.server.token
        if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer …)", code="invalid_api_key")

    def _models(self) -> None:
        self._json(200, {"object": "list", "data": [self.server.chat.info()]})

    def _chat(self) -> None:
        raw_length = self.headers.get("Content-Length") or "0"
        if not raw_length.strip().isdigit():
            self.close_connection = True  # the body's end is unknown: this connection cannot carry another request
            raise RequestError(400, f"Content-Length must be a non-negative integer, got {raw_length!r}")
        length, limit = int(raw_length), self.server.max_body_bytes
        if length > limit:  # refused unread: a body this large is never parsed nor tokenised
            self.close_connection = True
            raise RequestError(400, f"the request body of {length:,} bytes is over the server's limit of {limit:,} "
                                    "(server.max_body_bytes)", code="request_too_large")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None
        chat = self.server.chat
        request = chat.parse(body)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": chat.name}
        if not request.stream:
            done = chat.complete(request)
            self._json(200, {
                **head, "object": "chat.completion", "exit_layer": done.exit_layer,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": done.finish_reason}],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens},
            })
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> None:
            chunk = {**head, "object": "chat.completion.chunk", "exit_layer": request.exit_layer,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        event({"role": "assistant", "content": ""})
        done = chat.complete(request, on_text=lambda text: event({"content": text}))
        event({}, done.finish_reason, {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                                       "total_tokens": done.prompt_tokens + done.completion_tokens})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)


def check_exposure(host: str, token: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to listen beyond the loopback interface without a token, unless explicitly allowed."""
    if not is_loopback(host) and not token and not allow_unauthenticated:
        raise EarlyExitError(
            f"refusing to serve on {host!r} without a bearer token: anyone who can reach it could use the model; "
            "set --server.token_env NAME (the token is read from that environment variable), "
            "or pass --server.allow_unauthenticated true"
        )


def make_server(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                allow_unauthenticated: bool = False, max_body_bytes: int = 1_000_000) -> Server:
    """A ready (not yet serving) server; ``port`` 0 picks a free port (see ``server.url``)."""
    check_exposure(host, token, allow_unauthenticated)
    try:
        return Server(chat, host, port, token, max_body_bytes)
    except OSError as err:
        raise EarlyExitError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def read_token(token_env: str | None) -> str | None:
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise EarlyExitError(f"--server.token_env {token_env}: the environment variable {token_env} is not set (or empty)")
    return token


@dataclass
class ServeArgs:
    """Where and how the server listens.

    Args:
        served_name: the model name clients send (default: ``--model.name``).
        host: address to listen on (loopback by default; any other needs a token or an explicit allowance).
        port: port, 0..65535 (0: any free port).
        token_env: environment variable holding a bearer token that every request must carry.
        allow_unauthenticated: allow a non-loopback ``--server.host`` without a token.
        max_tokens: answer length when a request gives none.
        max_tokens_limit: the most tokens a request may ask for.
        max_body_bytes: a request body larger than this is answered 400 before it is read.
        context: a prompt that does not fit the model's window with its max_tokens: ``refuse`` (400,
            ``context_length_exceeded``) or ``truncate`` (its last tokens kept; the log counts the tokens dropped).
    """

    served_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    token_env: str | None = None
    allow_unauthenticated: bool = False
    max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_body_bytes: int = 1_000_000
    context: Context = "refuse"

    def __post_init__(self):
        require(0 <= self.port <= 65535, "server.port", self.port, "in 0..65535")
        positive("server.max_body_bytes", self.max_body_bytes)
        positive("server.max_tokens", self.max_tokens)
        require(self.max_tokens_limit >= self.max_tokens, "server.max_tokens_limit", self.max_tokens_limit,
                f"≥ server.max_tokens ({self.max_tokens})")


def build_parser():
    from earlyexit.cli import make_parser

    parser = make_parser("python -m earlyexit.serve", __doc__)
    parser.add_class_arguments(ModelArgs, "model")
    parser.add_class_arguments(ServeArgs, "server")
    return parser


@report_errors
def main(argv: list[str] | None = None) -> None:
    from earlyexit.cli import save_config
    from earlyexit.loading import load_model

    parser = build_parser()
    cfg = parser.parse_args(argv)
    model_args, args = ModelArgs(**cfg.model), ServeArgs(**cfg.server)
    token = read_token(args.token_env)
    check_exposure(args.host, token, args.allow_unauthenticated)  # before minutes of model loading
    save_config(parser, cfg, None)  # the server has no output directory: its resolved config goes to its log
    lm, tokenizer = load_model(model_args)
    chat = ChatModel(lm, tokenizer, args.served_name or model_args.name, args.max_tokens, args.max_tokens_limit,
                     args.context)
    server = make_server(chat, args.host, args.port, token, args.allow_unauthenticated, args.max_body_bytes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(f"serving {chat.name} ({chat.ee.n_layers} layers) at {server.url}"
          f"{' (bearer token required)' if token else ''}; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
