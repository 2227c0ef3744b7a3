"""The judge: verdict parsing, the reference and local judges, the HTTP path against earlyexit.serve and
against a failing endpoint (retries, clear errors, verdicts kept), the cache, and the CLI end to end."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from earlyexit import judge as J
from earlyexit import verdicts as V
from earlyexit.data import encode_chat
from earlyexit.errors import EarlyExitError
from earlyexit.evaluate import main as evaluate_main
from earlyexit.serve import ChatModel, make_server
from commands import refusal, refusal_process
from tiny import EOS, PAD, char_tokenizer, records_file, tiny_model

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [{"instruction": f"What is item {i}?", "input": f"Item {i} is a red ball." if i % 3 else "",
            "output": f"Item {i} is a red ball."} for i in range(30)]


def cases(n: int = 6) -> list[V.Case]:
    return [V.Case(i, layer, "What colour?", "The ball is red.", "Red.", f"answer {i} at {layer}")
            for i in range(n // 2) for layer in (1, 2)]


# --- pure parts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply,verdict", [
    ('{"correct": true}', "correct"),
    ('Sure! {"correct": false} because ...', "incorrect"),
    ('```json\n{"correct": true}\n```', "correct"),
    ("Yes, it is right.", "correct"),
    ("no.", "incorrect"),
    ("Incorrect: the ball is red", "incorrect"),
    ("Correct", "correct"),
    ('{"correct": "maybe"}', "unparsable"),
    ("The answer is not correct", "unparsable"),
    ("", "unparsable"),
    ("{broken json", "unparsable"),
])
def test_parse_verdict(reply, verdict):
    assert V.parse_verdict(reply) == verdict


def test_token_f1_and_normalisation():
    assert V.normalize("The Ball, is RED!") == ["ball", "is", "red"]
    assert V.token_f1("the red ball", "A ball that is red") == pytest.approx(2 * (2 / 2) * (2 / 4) / (1 + 2 / 4))
    assert V.token_f1("", "") == 1.0 and V.token_f1("", "red") == 0.0 and V.token_f1("blue", "red") == 0.0


def test_wilson_interval():
    low, high = V.wilson(3, 6)
    assert (round(low, 4), round(high, 4)) == (0.1876, 0.8124)
    assert V.wilson(0, 6)[0] == 0.0 and round(V.wilson(0, 6)[1], 4) == 0.3903
    assert V.wilson(0, 0) == (0.0, 1.0)


def test_tally_counts_unparsable_as_not_correct():
    verdicts = {(0, 1): {"verdict": "correct"}, (1, 1): {"verdict": "unparsable"}, (2, 1): {"verdict": "incorrect"},
                (0, 2): {"verdict": "correct"}}
    rows = J.tally(verdicts, [1, 2])
    assert rows[0] | {"accuracy_ci": None} == {"layer": 1, "n": 3, "correct": 1, "incorrect": 1, "unparsable": 1,
                                                "accuracy": 1 / 3, "accuracy_ci": None}
    assert rows[1]["accuracy"] == 1.0
    assert "| Layer | Correct |\n|---|---|\n| 1 | 33.3% [" in J.format_table(rows)


def test_reference_judge_is_deterministic():
    judge = V.ReferenceJudge("f1", 0.5)
    cs = [V.Case(0, 1, "q", "c", "The ball is red.", "the ball is red"), V.Case(1, 1, "q", "c", "The ball is red.", "blue sky")]
    got = []
    judge.replies(cs, lambda case, verdict, reply: got.append((case.id, verdict, reply)))
    assert got == [(0, "correct", "f1=1.0000"), (1, "incorrect", "f1=0.0000")]
    assert "not an LLM judge" in judge.label
    exact = []
    V.ReferenceJudge("exact").replies(cs, lambda case, verdict, reply: exact.append(verdict))
    assert exact == ["correct", "incorrect"]


def test_the_llm_judge_s_threshold_never_moves_the_reference_judge_s():
    # configs/smollm2_judge.yaml sets threshold 0.718 (P(true)); `--judge.kind reference` on it must stay at F1 >= 0.5
    judge = J.make_judge(J.JudgeArgs(kind="reference", threshold=0.718), None, None)
    assert judge.threshold == 0.5 and "token F1 ≥ 0.5 " in judge.label
    assert J.make_judge(J.JudgeArgs(kind="reference", reference_threshold=0.8), None, None).threshold == 0.8


def test_load_items_alpaca_and_custom_fields(tmp_path_factory):
    items = J.load_items(J.JudgeData(source=records_file(tmp_path_factory, RECORDS)))
    assert [i for i, _ in items] == [i for i in range(30) if i % 3]
    assert items[0][1] == {"instruction": "What is item 1?", "input": "Item 1 is a red ball.", "output": "Item 1 is a red ball."}
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "passage": f"p{i}", "gold": f"a{i}"}) for i in range(5)))
    custom = J.load_items(J.JudgeData(source=str(path), question_field="q", context_field="passage", answer_field="gold",
                                      offset=1, limit=2))
    assert custom == [(1, {"instruction": "q1", "input": "p1", "output": "a1"}), (2, {"instruction": "q2", "input": "p2", "output": "a2"})]
    with pytest.raises(EarlyExitError, match=r"record 0: missing field .context. \(set --data.context_field"):
        J.load_items(J.JudgeData(source=str(path), question_field="q", context_field="context", answer_field="gold"))
    with pytest.raises(EarlyExitError, match="no record with a non-empty 'input'"):
        J.load_items(J.JudgeData(source=records_file(tmp_path_factory, [r | {"input": ""} for r in RECORDS])))


def test_cache_survives_a_torn_line(tmp_path):
    cache = V.VerdictCache(tmp_path / "v.jsonl")
    key = V.VerdictCache.key("judge", [{"role": "user", "content": "x"}])
    cache.add(key, "judge", "correct", '{"correct": true}')
    with open(tmp_path / "v.jsonl", "a") as f:
        f.write('{"key": "torn')
    again = V.VerdictCache(tmp_path / "v.jsonl")
    assert again.get(key)["verdict"] == "correct" and len(again.entries) == 1
    assert V.VerdictCache.key("other", [{"role": "user", "content": "x"}]) != key


# --- the HTTP path against earlyexit.serve --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chat():
    lm = tiny_model("llama")
    lm.generation_config.eos_token_id, lm.generation_config.pad_token_id = EOS, PAD
    lm.config.max_position_embeddings = 2048  # rotary positions: the judge prompt is longer than the tiny default
    return ChatModel(lm, char_tokenizer(), "tiny")


@pytest.fixture(scope="module")
def served(tiny_chat):
    server = make_server(tiny_chat, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_judge_against_the_server_and_the_cache(served, tiny_chat, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a loopback endpoint needs no key
    calls = []
    complete = tiny_chat.complete
    monkeypatch.setattr(tiny_chat, "complete", lambda request, on_text=None: calls.append(1) or complete(request, on_text))
    judge = J.OpenAIJudge(J.JudgeArgs(kind="openai", model="tiny", base_url=served.url, max_tokens=8, concurrency=3, shots=False))
    cache = V.VerdictCache(tmp_path / "v.jsonl")
    first = V.judge_cases(judge, cases(), cache)
    assert len(calls) == 6 and len(cache.entries) == 6
    for case in cases():  # each verdict is what the served model says at temperature 0, parsed
        request = tiny_chat.parse({"model": "tiny", "messages": case.messages(False), "temperature": 0, "max_tokens": 8})
        reply = complete(request).text
        assert first[(case.id, case.layer)]["reply"] == reply
        assert first[(case.id, case.layer)]["verdict"] == V.parse_verdict(reply)
    again = V.judge_cases(judge, cases(), V.VerdictCache(tmp_path / "v.jsonl"))
    assert again == first and len(calls) == 6  # cache hits never reach the endpoint
    twins = [V.Case(9, layer, "q", "c", "r", "same answer") for layer in (1, 2, 3)]
    assert len(V.judge_cases(judge, twins, cache)) == 3 and len(calls) == 7  # one prompt, asked once


# --- a failing endpoint ---------------------------------------------------------------------------------


class Flaky(ThreadingHTTPServer):
    """Answers per a plan of modes (then ``default``): ok, 500, 429, 401, slow, malformed, shape."""

    daemon_threads = True

    def __init__(self, plan: list[str], default: str):
        self.plan, self.default, self.requests = list(plan), default, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), FlakyHandler)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class FlakyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.requests += 1
            mode = self.server.plan.pop(0) if self.server.plan else self.server.default
        status, body = 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": '{"correct": true}'},
                                          "finish_reason": "stop"}]}
        if mode == "slow":
            time.sleep(3.0)  # past the slow tests' timeout of 1.5 s
        elif mode in ("500", "429", "401"):
            status, body = int(mode), {"error": {"message": f"injected {mode}", "type": "x", "param": None, "code": None}}
        elif mode == "shape":
            body = {"unexpected": True}
        raw = b"{not json" if mode == "malformed" else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        try:
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out first
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    servers = []

    def make(plan=(), default="ok"):
        server = Flaky(list(plan), default)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def openai_judge(url: str, **kw) -> J.OpenAIJudge:
    """A generous timeout: a loaded CI machine must not turn an injected 500 into a timeout. The slow tests pass 1.5 s."""
    args = dict(kind="openai", model="m", base_url=url, max_retries=2, timeout=10.0, concurrency=1, shots=False) | kw
    return J.OpenAIJudge(J.JudgeArgs(**args))


@pytest.mark.parametrize("mode,needle", [
    ("500", "last: HTTP 500: injected 500"),
    ("429", "last: HTTP 429: injected 429"),
    ("slow", "last: timed out after 1.5 s"),
])
def test_persistent_failures_retry_then_fail_clearly(flaky, tmp_path, mode, needle):
    server = flaky(default=mode)
    with pytest.raises(EarlyExitError) as err:
        V.judge_cases(openai_judge(server.url, timeout=1.5), cases(), V.VerdictCache(tmp_path / "v.jsonl"))
    message = str(err.value)
    assert f"the judge endpoint {server.url} failed 3 times; {needle}" in message, message
    assert "0 of 6 verdicts are kept" in message
    assert server.requests == 3  # one request, two retries; the other cases were never sent


@pytest.mark.parametrize("mode", ["malformed", "shape"])
def test_a_malformed_response_fails_at_once_with_one_line(flaky, tmp_path, mode):
    server = flaky(default=mode)
    with pytest.raises(EarlyExitError) as err:
        V.judge_cases(openai_judge(server.url), cases(), V.VerdictCache(tmp_path / "v.jsonl"))
    assert f"the judge endpoint {server.url} sent a malformed response" in str(err.value)
    assert server.requests == 1  # not retried: the endpoint is not speaking the API


def test_verdicts_obtained_before_a_failure_are_kept(flaky, tmp_path):
    server = flaky(plan=["ok", "ok", "500", "ok"], default="500")
    path = tmp_path / "v.jsonl"
    with pytest.raises(EarlyExitError, match="3 of 6 verdicts are kept in"):
        V.judge_cases(openai_judge(server.url), cases(), V.VerdictCache(path))  # the 3rd case succeeds on its retry
    assert len(path.read_text().splitlines()) == 3 and server.requests == 7
    assert {e["verdict"] for e in V.VerdictCache(path).entries.values()} == {"correct"}


def test_rerun_against_the_same_endpoint_asks_only_what_is_missing(flaky, tmp_path):
    server = flaky(plan=["ok", "ok"], default="500")
    path = tmp_path / "v.jsonl"
    with pytest.raises(EarlyExitError):
        V.judge_cases(openai_judge(server.url), cases(), V.VerdictCache(path))
    server.default, before = "ok", server.requests
    verdicts = V.judge_cases(openai_judge(server.url, concurrency=4), cases(), V.VerdictCache(path))
    assert len(verdicts) == 6 and server.requests - before == 4


def test_a_transient_failure_is_retried(flaky, tmp_path):
    server = flaky(plan=["500", "slow"])
    verdicts = V.judge_cases(openai_judge(server.url, timeout=1.5), cases(2), V.VerdictCache(tmp_path / "v.jsonl"))
    assert len(verdicts) == 2 and server.requests == 4


def test_an_authentication_error_is_not_retried(flaky, tmp_path):
    server = flaky(default="401")
    with pytest.raises(EarlyExitError, match=r"refused the request: HTTP 401: injected 401 \(check OPENAI_API_KEY\)"):
        V.judge_cases(openai_judge(server.url), cases(), V.VerdictCache(tmp_path / "v.jsonl"))
    assert server.requests == 1


def test_unreachable_endpoint(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EarlyExitError, match="failed 3 times; last: could not connect"):
        V.judge_cases(openai_judge(f"http://127.0.0.1:{port}/v1"), cases(), V.VerdictCache(tmp_path / "v.jsonl"))


def test_remote_endpoint_needs_the_key_variable(monkeypatch):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(EarlyExitError, match="set the environment variable MY_JUDGE_KEY"):
        J.OpenAIJudge(J.JudgeArgs(kind="openai", model="gpt-4o-mini", base_url="https://api.example.com/v1", api_key_env="MY_JUDGE_KEY"))
    monkeypatch.setenv("MY_JUDGE_KEY", "k")
    assert J.OpenAIJudge(J.JudgeArgs(kind="openai", model="gpt-4o-mini", base_url="https://api.example.com/v1",
                                     api_key_env="MY_JUDGE_KEY")).name == "openai:https://api.example.com/v1:gpt-4o-mini"


# --- the local judge and the CLI ------------------------------------------------------------------------


def test_the_judge_reads_the_worked_examples_first_unless_told_not_to():
    case = V.Case(3, 8, "Name a colour.", "The sky is blue.", "Blue", "blue")
    turns = case.messages()
    assert [t["role"] for t in turns] == ["system"] + ["user", "assistant"] * len(V.JUDGE_SHOTS) + ["user"]
    for (question, context, reference, answer, correct), user, reply in zip(V.JUDGE_SHOTS, turns[1::2], turns[2::2]):
        assert question in user["content"] and answer in user["content"] and reference in user["content"]
        assert V.parse_verdict(reply["content"]) == ("correct" if correct else "incorrect")
    assert {True, False} == {shot[-1] for shot in V.JUDGE_SHOTS}  # examples of both verdicts
    assert turns[-1] == case.messages(False)[-1] and len(case.messages(False)) == 2
    assert turns[-1]["content"].count("Name a colour.") == 1 and "blue" in turns[-1]["content"]
    assert V.VerdictCache.key("j", turns) != V.VerdictCache.key("j", case.messages(False))  # cached apart


def test_local_judge_is_deterministic_and_equals_the_library(tiny_chat):
    judge = J.LocalJudge(tiny_chat.ee.lm, tiny_chat.tokenizer, "tiny", max_tokens=6, batch_size=4, constrained=False, shots=False)
    runs = []
    for _ in range(2):
        got = {}
        judge.replies(cases(), lambda case, verdict, reply: got.__setitem__((case.id, case.layer), (verdict, reply)))
        runs.append(got)
    assert runs[0] == runs[1] and len(runs[0]) == 6
    case = cases()[3]
    ids = torch.tensor([encode_chat(case.messages(False), tiny_chat.tokenizer)])
    out = tiny_chat.ee.generate(ids, torch.ones_like(ids), 4, max_new_tokens=6, pad_token_id=PAD)
    reply = tiny_chat.tokenizer.decode(out.tokens[0, : int(out.n_tokens[0])].tolist(), skip_special_tokens=True)
    assert runs[0][(case.id, case.layer)] == (V.parse_verdict(reply), reply)


def test_a_constrained_verdict_is_never_unparsable_and_is_the_model_s_own_preference(tiny_chat):
    """The reply forced to ``{"correct": `` and scored between true and false, in a left-padded batch: every verdict
    is correct or incorrect, and each is what the model alone, unpadded, prefers."""
    judge = J.LocalJudge(tiny_chat.ee.lm, tiny_chat.tokenizer, "tiny", batch_size=4, shots=False)
    assert judge.name == "local:tiny:constrained"
    got = {}
    judge.replies(cases(8), lambda case, verdict, reply, score: got.__setitem__((case.id, case.layer), (verdict, reply)))
    assert len(got) == 8 and {v for v, _ in got.values()} <= {"correct", "incorrect"}
    assert all(V.parse_verdict(reply) == verdict for verdict, reply in got.values())  # its reply says the same
    prefix, yes, no = judge.verdict_tokens()
    tok = tiny_chat.tokenizer
    assert tok.decode(prefix) == '{"correct": ' and tok.decode([yes]) == "t" and tok.decode([no]) == "f"
    for case in cases(8):
        ids = torch.tensor([encode_chat(case.messages(False), tok) + prefix])
        logits = tiny_chat.ee.lm(input_ids=ids).logits[0, -1]
        expected = "correct" if logits[yes] > logits[no] else "incorrect"
        assert got[(case.id, case.layer)][0] == expected, case


class StubJudge:
    """A judge with known answers: ``rule(case)`` → verdict; counts what it is asked."""

    def __init__(self, name, rule):
        self.name, self.label, self.rule, self.asked = name, name, rule, 0

    def replies(self, cases, done):
        for case in cases:
            self.asked += 1
            done(case, self.rule(case), "stub")


def test_calibration_counts_a_judge_s_rates_and_flags_one_that_fails(tmp_path):
    from earlyexit.calibration import DEGENERATE, OTHER, REFERENCE, calibrate, calibration_cases, describe

    items = J.load_items(J.JudgeData(source=records_file_of(tmp_path, RECORDS)))
    made = calibration_cases(items)
    kinds = [c.layer for c in made]
    assert kinds.count(REFERENCE) == kinds.count(OTHER) == kinds.count(DEGENERATE) == len(items) == 20
    assert all(c.answer == c.reference for c in made if c.layer == REFERENCE)
    assert all(c.answer != c.reference for c in made if c.layer == OTHER)
    loops = [c for c in made if c.layer == DEGENERATE]  # the reference's first four words, again and again
    assert all(c.answer.split()[:8] == c.reference.split()[:4] * 2 and len(c.answer.split()) >= 12 for c in loops)
    exact = StubJudge("exact", lambda c: "correct" if c.answer == c.reference else "incorrect")
    report = calibrate(exact, items, V.VerdictCache(tmp_path / "exact.jsonl"))
    rates = (report["true_positive_rate"], report["true_negative_rate"], report["degenerate_negative_rate"])
    assert rates == (1.0, 1.0, 1.0) and report["unparsable"] == 0
    assert report["passed"] and "— passed" in describe(report)
    # the reference judge (token F1 ≥ 0.5) takes the other records' answers here, which differ in one word of six, for
    # correct, and the degenerate ones (F1 4/9) for incorrect
    assert report["agreement_with_reference"] == pytest.approx(2 / 3)
    assert report["true_positive_ci"][0] > 0.8
    calibrate(exact, items, V.VerdictCache(tmp_path / "exact.jsonl"))  # resumed: nothing asked twice
    assert exact.asked == 60
    lenient = StubJudge("lenient", lambda c: "correct")
    report = calibrate(lenient, items, V.VerdictCache(tmp_path / "lenient.jsonl"))
    assert report["true_negative_rate"] == 0.0 and not report["passed"] and "FAILED" in describe(report)
    mute = StubJudge("mute", lambda c: "unparsable" if c.id % 2 else ("correct" if c.answer == c.reference else "incorrect"))
    report = calibrate(mute, items, V.VerdictCache(tmp_path / "mute.jsonl"))
    assert report["unparsable"] > 0 and not report["passed"]


class ScoringJudge(StubJudge):
    """A judge that scores each answer (``score(case)``) and calls it correct at or above ``threshold``."""

    def __init__(self, name, score, threshold):
        super().__init__(name, None)
        self.score, self.threshold = score, threshold

    def decide(self, score):
        return "correct" if score >= self.threshold else "incorrect"

    def replies(self, cases, done):
        for case in cases:
            self.asked += 1
            done(case, self.decide(self.score(case)), "scored", self.score(case))


def test_a_scoring_judge_s_threshold_is_fitted_on_its_scores_and_a_new_one_asks_nothing_again(tmp_path):
    from earlyexit.calibration import best_threshold, calibrate, describe

    fit = best_threshold([0.7, 0.9], [0.2, 0.6])
    assert fit["threshold"] == pytest.approx(0.65) and fit["rates"] == [1, 1]
    fit = best_threshold([0.9, 0.8, 0.6, 0.55], [0.1, 0.3, 0.58, 0.5])  # not separable: one error on either side
    assert min(fit["rates"]) == 0.75
    assert best_threshold([0.7, 0.9], [0.2, 0.3], [0.8, 0.1])["rates"] == [1.0, 1.0, 0.5]  # every negative list counts
    # the kinds a judge must pass first: a cut that costs a reference answer for a degenerate one is not taken
    fit = best_threshold([0.6, 0.9, 0.95, 0.97], [0.1, 0.2, 0.3, 0.4], [0.5, 0.7, 0.75, 0.1])  # at 0.8: 75%, 100%, 100%
    assert fit["rates"] == [1.0, 1.0, 0.5] and 0.5 < fit["threshold"] < 0.6
    items = J.load_items(J.JudgeData(source=records_file_of(tmp_path, RECORDS)))
    score = lambda c: 0.7 if c.answer == c.reference else 0.4  # noqa: E731: a lenient judge at 0.5 would pass
    lenient = ScoringJudge("scoring", score, 0.3)
    report = calibrate(lenient, items, V.VerdictCache(tmp_path / "v.jsonl"))
    assert report["true_negative_rate"] == 0.0 and not report["passed"] and report["threshold"] == 0.3
    assert report["best_threshold"]["threshold"] == pytest.approx(0.55) and report["best_threshold"]["rates"] == [1, 1, 1]
    assert "threshold 0.550 would balance them best (100.0%, 100.0%, 100.0%)" in describe(report)
    refitted = ScoringJudge("scoring", score, 0.55)
    report = calibrate(refitted, items, V.VerdictCache(tmp_path / "v.jsonl"))
    assert refitted.asked == 0 and report["passed"]  # the cached scores, decided again
    assert json.loads((tmp_path / "v.jsonl").read_text().splitlines()[0])["score"] in (0.7, 0.4)


def records_file_of(tmp_path, records) -> str:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_a_killed_judging_run_resumes_without_asking_twice(tmp_path):
    """The verdicts given before a run is killed are on disk; the rerun asks only for the others."""
    items = J.load_items(J.JudgeData(source=records_file_of(tmp_path, RECORDS)))
    cases_ = [V.Case(i, 1, r["instruction"], r["input"], r["output"], f"answer {i}") for i, r in items]

    class Killed(Exception):
        pass

    def dies_after(n):
        def rule(case):
            if judge.asked > n:
                raise Killed
            return "incorrect"
        return rule

    judge = StubJudge("stub", None)
    judge.rule = dies_after(7)
    with pytest.raises(Killed):
        V.judge_cases(judge, cases_, V.VerdictCache(tmp_path / "v.jsonl"))
    again = StubJudge("stub", lambda c: "incorrect")
    verdicts = V.judge_cases(again, cases_, V.VerdictCache(tmp_path / "v.jsonl"))
    assert len(verdicts) == len(cases_) and again.asked == len(cases_) - 7


def cli_args(tiny_dir, data, out, *extra):
    return ["--model.name", tiny_dir, "--model.device", "cpu", "--data.source", data, "--data.limit", "5",
            "--generation.max_new_tokens", "6", "--exit_layers", "all", "--out_dir", str(out), "--judge.shots", "false", *extra]


def test_cli_end_to_end_with_resume(tiny_dir, tmp_path_factory, tmp_path, capsys):
    data = records_file(tmp_path_factory, RECORDS)
    out = tmp_path / "judge"
    J.main(cli_args(tiny_dir, data, out, "--judge.kind", "reference"))
    printed = capsys.readouterr()
    assert "| Layer | Correct |" in printed.out and "not an LLM judge" in printed.out
    for name in ("metrics.json", "metrics.csv", "table.md", "judgements.jsonl", "correct.png", "verdicts.jsonl"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "metrics.json").read_text())
    assert [r["layer"] for r in report["layers"]] == [1, 2, 3, 4] and all(r["n"] == 5 for r in report["layers"])
    assert report["example_ids"] == [1, 2, 4, 5, 7]
    answers = (out / "answers" / "generations.jsonl").read_text()
    assert len(answers.splitlines()) == 20
    J.main(cli_args(tiny_dir, data, out, "--judge.kind", "reference"))  # a rerun generates and asks nothing
    assert "20 answers to judge; 20 verdicts cached" in capsys.readouterr().err
    assert (out / "answers" / "generations.jsonl").read_text() == answers
    J.main(cli_args(tiny_dir, data, tmp_path / "local", "--judge.kind", "local", "--answers", str(out / "answers")))
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert local["judge"] == f"local:{tiny_dir}:constrained" and local["layers"][0]["unparsable"] == 0
    assert sum(local["layers"][0][k] for k in ("correct", "incorrect")) == 5
    assert 0 <= local["layers"][0]["agreement_with_reference"] <= 1 and local["calibration"]["records"] == 5
    table = (tmp_path / "local" / "table.md").read_text()
    assert "calibration on 5 records with a context" in table and "agreement with the reference judge" in table
    J.main(cli_args(tiny_dir, data, tmp_path / "calibrated", "--judge.kind", "local", "--calibrate", "true"))
    printed = capsys.readouterr().out
    assert "calibration on 5 records with a context: reference answers judged correct" in printed
    assert json.loads((tmp_path / "calibrated" / "calibration.json").read_text())["unparsable"] == 0
    assert not (tmp_path / "calibrated" / "answers").exists()  # calibrating generates no answers


def test_reuses_the_evaluation_generations(tiny_dir, tmp_path_factory, tmp_path):
    data = records_file(tmp_path_factory, RECORDS)
    evaluate_main(["--model.name", tiny_dir, "--model.device", "cpu", "--data.source", data, "--generation.max_new_tokens", "6",
                   "--metrics.names", "[rougeL]", "--metrics.bootstrap", "0", "--exit_layers", "2,4", "--out_dir", str(tmp_path / "eval")])
    before = (tmp_path / "eval" / "generations.jsonl").read_text()
    J.main(cli_args(tiny_dir, data, tmp_path / "judge", "--judge.kind", "reference", "--exit_layers", "2,4",
                    "--answers", str(tmp_path / "eval")))
    assert (tmp_path / "eval" / "generations.jsonl").read_text() == before
    judged = [json.loads(line) for line in (tmp_path / "judge" / "judgements.jsonl").read_text().splitlines()]
    evaluated = {(r["id"], r["layer"]): r["text"] for r in map(json.loads, before.splitlines())}
    assert all(j["answer"] == evaluated[(j["id"], j["layer"])] for j in judged) and len(judged) == 10


@pytest.mark.parametrize("extra,message", [
    (["--data.context_field", "passage"], "missing field 'passage' (set --data.context_field"),
    (["--judge.kind", "openai", "--judge.model", "gpt-4o-mini", "--judge.base_url", "https://api.example.com/v1",
      "--judge.api_key_env", "EARLYEXIT_NO_SUCH_KEY"], "set the environment variable EARLYEXIT_NO_SUCH_KEY"),
    (["--judge.kind", "openai"], "--judge.model is required with --judge.kind openai"),
    (["--judge.kind", "reference", "--calibrate", "true"], "--calibrate calibrates an LLM judge"),
    (["--judge.kind", "openai", "--judge.model", "m", "--judge.base_url", "http://127.0.0.1:9/v1",
      "--judge.max_retries", "1"], "failed 2 times; last: could not connect"),
])
def test_cli_bad_input(tiny_dir, tmp_path_factory, tmp_path, extra, message, monkeypatch, capsys):
    data = records_file(tmp_path_factory, RECORDS)
    assert message in refusal("judge", cli_args(tiny_dir, data, tmp_path / "j", *extra), monkeypatch, capsys)


def test_cli_bad_input_in_a_real_process(tiny_dir, tmp_path_factory, tmp_path):
    data = records_file(tmp_path_factory, RECORDS)
    last = refusal_process("earlyexit.judge", cli_args(tiny_dir, data, tmp_path / "j", "--judge.kind", "openai"))
    assert "--judge.model is required with --judge.kind openai" in last

def test_the_worked_examples_are_run_once_and_score_as_the_whole_prompt(tiny_chat):
    """With the worked examples, the prompts' shared start is run once and each prompt's own tokens after its keys
    and values: every P(true) equals the whole prompt's, run alone and unpadded."""
    judge = J.LocalJudge(tiny_chat.ee.lm, tiny_chat.tokenizer, "tiny", batch_size=3)
    scores = {}
    judge.replies(cases(5), lambda case, verdict, reply, score: scores.__setitem__((case.id, case.layer), score))
    prefix, yes, no = judge.verdict_tokens()
    prompts = [encode_chat(case.messages(), tiny_chat.tokenizer) + prefix for case in cases(5)]
    length, _ = judge._shared(prompts, "cpu")
    assert length > 1000  # the system prompt and the worked examples (a character tokenizer)
    for case, prompt in zip(cases(5), prompts):
        with torch.inference_mode():
            logits = tiny_chat.ee.lm(input_ids=torch.tensor([prompt])).logits[0, -1].float()
        alone = float(torch.softmax(logits[[yes, no]], -1)[0])
        assert abs(scores[(case.id, case.layer)] - alone) < 1e-4, case
