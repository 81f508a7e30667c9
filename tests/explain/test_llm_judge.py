"""The LLM judge against a local server that speaks the chat-completions wire format."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clipheads.explain.concepts import concept_consistency
from clipheads.explain.judges import JudgeError, LLMJudge

KEY = "sk-test-secret-0123456789"


@dataclass
class Trickle:
    """A raw HTTP response: its first ``at_once`` bytes sent at once, then one byte every ``interval`` seconds."""

    raw: bytes
    at_once: int = 0
    interval: float = 0.2


class Server:
    """A chat-completions endpoint on 127.0.0.1 (HTTP/1.1, keep-alive); ``script`` returns (status, content or raw
    body, delay[, headers]); a :class:`Trickle` body is sent byte by byte as the whole response.

    ``connections`` counts the TCP connections the server accepted; ``times`` the arrival time of each request.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.connections = 0
        self.script = self.answer
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep the connection open between requests

            def setup(self):
                outer.connections += 1
                super().setup()

            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.times.append(time.monotonic())
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content, delay, *headers = outer.script(body, len(outer.requests))
                time.sleep(delay)
                try:
                    if isinstance(content, Trickle):
                        self.wfile.write(content.raw[:content.at_once])
                        for i in range(content.at_once, len(content.raw)):
                            time.sleep(content.interval)
                            self.wfile.write(content.raw[i:i + 1])
                        return
                    reply = content if status != 200 or isinstance(content, bytes) else json.dumps(
                        {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    for name, value in (headers[0] if headers else {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def answer(body, n):
        prompt = body["messages"][-1]["content"]
        if '"label"' in prompt:
            return 200, 'Sure:\n```json\n{"label": "Colours"}\n```', 0
        n_texts = sum(1 for line in prompt.splitlines() if line[:1].isdigit())
        return 200, json.dumps({"consistent": [i % 2 == 0 for i in range(n_texts)]}), 0


@pytest.fixture()
def server():
    server = Server()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def judge(server, **kwargs):
    return LLMJudge(server.url, "test-model", api_key=KEY, **{"timeout": 2.0, "retries": 2, "backoff": 0.01,
                                                              **kwargs})


TEXTS = ["a red car", "a blue sky", "a photo of a dog", "green grass", "a purple flower"]


def test_label_and_judgement_over_the_wire(server):
    llm = judge(server)
    assert llm.label(TEXTS) == "colours"
    assert llm.judge("colours", TEXTS) == [True, False, True, False, True]
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == f"Bearer {KEY}"
    assert request["body"]["model"] == "test-model" and request["body"]["messages"][0]["role"] == "system"
    assert "1. a red car" in request["body"]["messages"][1]["content"]


def test_settings_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("CLIPHEADS_LLM_BASE_URL", server.url)
    monkeypatch.setenv("CLIPHEADS_LLM_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    llm = LLMJudge(retries=0)
    assert llm.label(TEXTS) == "colours" and server.requests[-1]["auth"] == f"Bearer {KEY}"
    monkeypatch.delenv("CLIPHEADS_LLM_MODEL")
    with pytest.raises(JudgeError, match="CLIPHEADS_LLM_MODEL"):
        LLMJudge()


def test_server_errors_and_timeouts_are_retried(server):
    server.script = lambda body, n: (503, b"busy", 0) if n < 3 else Server.answer(body, n)
    assert judge(server).label(TEXTS) == "colours" and len(server.requests) == 3
    server.requests.clear()
    server.script = lambda body, n: (200, "{}", 0.6) if n == 1 else Server.answer(body, n)
    assert judge(server, timeout=0.3).label(TEXTS) == "colours" and len(server.requests) == 2


def test_giving_up_and_malformed_replies_are_clear_errors(server, caplog):
    server.script = lambda body, n: (200, "{}", 0.5)
    with pytest.raises(JudgeError, match=r"no answer after 2 attempts \(timed out after 0.2 s\)"):
        judge(server, timeout=0.2, retries=1).label(TEXTS)
    server.script = lambda body, n: (200, "I think these are colours.", 0)
    with pytest.raises(JudgeError, match="malformed reply, expected JSON with 'label'"):
        judge(server).label(TEXTS)
    server.script = lambda body, n: (200, '{"consistent": [true, false]}', 0)
    with pytest.raises(JudgeError, match="malformed reply, expected JSON with 'consistent'"):
        judge(server).judge("colours", TEXTS)
    server.script = lambda body, n: (200, b'{"choices": []}', 0)
    with pytest.raises(JudgeError, match="malformed chat-completions response"):
        judge(server).label(TEXTS)
    server.script = lambda body, n: (401, b'{"error": "bad key"}', 0)
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge(server).label(TEXTS)


def test_finished_heads_are_kept_and_the_key_never_leaks(server, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    descriptions = {"L0.H0": TEXTS, "L0.H1": TEXTS[::-1], "L1.H0": TEXTS[1:] + TEXTS[:1]}
    checkpoint = tmp_path / "progress.json"
    # the endpoint breaks after two heads (2 requests per head)
    server.script = lambda body, n: (500, KEY.encode(), 0) if n > 4 else Server.answer(body, n)
    with pytest.raises(JudgeError) as failure:
        concept_consistency(descriptions, judge(server, retries=1), shape=(2, 2), checkpoint=checkpoint)
    saved = json.loads(checkpoint.read_text())
    assert [h["head"] for h in saved["heads"]] == ["L0.H0", "L0.H1"]
    server.requests.clear()
    server.script = Server.answer
    llm = judge(server)
    result = concept_consistency(descriptions, llm, shape=(2, 2), checkpoint=checkpoint)
    assert len(server.requests) == 2  # only the unfinished head was asked
    assert [h.ccs for h in result.heads] == [3, 3, 3] and result.judges == ["llm:test-model"]
    out = tmp_path / "ccs.json"
    result.save(out)
    # a server that echoes the key in an error body: the message redacts it
    server.script = lambda body, n: (400, json.dumps({"error": f"bad key {KEY}"}).encode(), 0)
    with pytest.raises(JudgeError) as echoed:
        llm.label(TEXTS)
    captured = capsys.readouterr()
    everything = [caplog.text, captured.out, captured.err, str(failure.value), str(echoed.value), repr(llm),
                  checkpoint.read_text(), out.read_text()]
    assert not any(KEY in text for text in everything)
    assert "***" in str(echoed.value)


def test_one_connection_is_reused_for_every_request(server):
    server.script = lambda body, n: (503, b"busy", 0) if n == 2 else Server.answer(body, n)
    with judge(server) as llm:
        assert llm.label(TEXTS) == "colours"
        assert llm.judge("colours", TEXTS) == [True, False, True, False, True]  # after one 503 and a retry
        assert llm.label(TEXTS[::-1]) == "colours"
    assert len(server.requests) == 4 and server.connections == 1


def test_retry_after_on_429_is_honoured_and_the_retry_is_a_warning(server, caplog):
    caplog.set_level(logging.WARNING, logger="clipheads")
    server.script = lambda body, n: (429, b'{"error": "slow down"}', 0, {"Retry-After": "1"}) if n == 1 \
        else Server.answer(body, n)
    with judge(server, backoff=0.05) as llm:
        assert llm.label(TEXTS) == "colours"
    waited = server.times[1] - server.times[0]
    assert 1.0 <= waited < 1.6, waited  # Retry-After 1 s plus at most 0.05 s of jitter (and some scheduling)
    assert "LLM judge test-model: attempt 1/3 HTTP 429 (Retry-After 1 s); retrying in 1.0 s" in caplog.text
    # a server that asks for longer than max_wait ends the run at once, saying so
    server.script = lambda body, n: (503, b"maintenance", 0, {"Retry-After": "3600"})
    server.requests.clear()
    with judge(server) as llm, pytest.raises(JudgeError, match="asks to wait 3600 s .more than 60 s.; try again"):
        llm.label(TEXTS)
    assert len(server.requests) == 1


def test_retry_after_as_an_http_date():
    from clipheads.explain.judges import retry_after_seconds

    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0
    assert retry_after_seconds("2.5") == 2.5 and retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None and retry_after_seconds("nan") is None


def test_backoff_has_jitter(server):
    server.script = lambda body, n: (503, b"busy", 0)
    runs = []
    for _ in range(2):
        slept = []
        with judge(server, retries=3, backoff=0.2) as llm:
            llm._sleep = slept.append  # record the waits instead of sleeping
            with pytest.raises(JudgeError, match=r"no answer after 4 attempts \(HTTP 503\)"):
                llm.label(TEXTS)
        runs.append(slept)
    bases = (0.2, 0.4, 0.8)  # exponential backoff, plus up to 0.2 s of jitter each
    jitters = [[s - base for s, base in zip(slept, bases, strict=True)] for slept in runs]
    assert all(0 <= j <= 0.2 for run in jitters for j in run)
    assert runs[0] != runs[1] and len({round(j, 6) for j in jitters[0]}) > 1


def test_json_followed_by_prose_with_braces_is_accepted(server):
    replies = ['{"label": "Animals"}\n\nI chose this because {most} texts name animals, e.g. {"dog": 1}.',
               'Here is {my} answer: {"label": "textures"} (see {notes})',
               '```json\n{"consistent": [true, false, true, false, true]}\n```\nNot {"consistent": []}.']
    server.script = lambda body, n: (200, replies[n - 1], 0)
    with judge(server) as llm:
        assert llm.label(TEXTS) == "animals"
        assert llm.label(TEXTS) == "textures"
        assert llm.judge("animals", TEXTS) == [True, False, True, False, True]


def test_json_output_is_asked_for_and_dropped_when_the_server_rejects_it(server):
    with judge(server) as llm:
        llm.label(TEXTS)
    assert server.requests[0]["body"]["response_format"] == {"type": "json_object"}

    def strict(body, n):
        if "response_format" in body:
            return 400, b'{"error": {"message": "response_format is not supported"}}', 0
        return Server.answer(body, n)

    server.script = strict
    server.requests.clear()
    with judge(server) as llm:
        assert llm.label(TEXTS) == "colours" and llm.judge("colours", TEXTS) == [True, False, True, False, True]
    assert ["response_format" in r["body"] for r in server.requests] == [True, False, False]
    # a 400 that is about something else: the error is reported, and JSON output is still asked for next time
    server.script = lambda body, n: (400, b'{"error": "context too long"}', 0)
    server.requests.clear()
    with judge(server) as llm:
        with pytest.raises(JudgeError, match="HTTP 400: .*context too long"):
            llm.label(TEXTS)
        assert llm.json_mode


def test_a_trickling_server_cannot_hold_an_attempt_past_the_timeout(server):
    body = json.dumps({"choices": [{"message": {"content": '{"label": "colours"}'}}]}).encode()
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert len(raw) * 0.2 > 20  # the whole reply would take over 20 s
    server.script = lambda body_, n: (200, Trickle(raw), 0)
    with judge(server, timeout=1.0, retries=0) as llm:
        start = time.monotonic()
        with pytest.raises(JudgeError, match=r"no answer after 1 attempts \(timed out after 1 s\)"):
            llm.label(TEXTS)
        elapsed = time.monotonic() - start
    assert 0.95 <= elapsed < 2.0, elapsed
    # headers on time, then the body byte by byte: bounded the same way
    server.script = lambda body_, n: (200, Trickle(raw, at_once=raw.index(b"\r\n\r\n") + 4), 0)
    with judge(server, timeout=1.0, retries=0) as llm:
        start = time.monotonic()
        with pytest.raises(JudgeError, match="timed out after 1 s"):
            llm.label(TEXTS)
        assert 0.95 <= time.monotonic() - start < 2.0


def test_a_refused_key_is_one_clear_line_without_the_key(server):
    server.script = lambda body, n: (401, json.dumps({"error": f"invalid key {KEY}"}).encode(), 0)
    with judge(server) as llm, pytest.raises(JudgeError) as refused:
        llm.label(TEXTS)
    message = str(refused.value)
    assert "refused the API key (HTTP 401)" in message and "OPENAI_API_KEY" in message
    assert KEY not in message and "\n" not in message and len(server.requests) == 1  # not retried


def test_timeout_and_base_url_are_checked_at_construction():
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(JudgeError, match="timeout must be a positive number of seconds"):
            LLMJudge("http://127.0.0.1:9/v1", "m", timeout=bad)
    for bad in ("127.0.0.1:8000/v1", "ftp://127.0.0.1/v1", "http://", "http://[::1"):
        with pytest.raises(JudgeError, match="base URL must be an http.s. URL"):
            LLMJudge(bad, "m")


def test_cli_refuses_a_timeout_that_is_not_positive_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from clipheads.cli import app

    for bad in ("0", "-1", "nan", "inf"):  # a model that does not exist: refused before it is looked for
        result = CliRunner().invoke(app, ["ccs", "--judge", "llm", "--llm-timeout", bad, "--model",
                                          str(tmp_path / "missing"), "--descriptions", str(tmp_path / "d.json")])
        assert result.exit_code == 2 and "Invalid value for '--llm-timeout'" in result.output, result.output
        assert ("must be greater than 0" in result.output or "is not a finite number" in result.output)
        assert "Traceback" not in result.output


@pytest.fixture()
def cli_logging(capsys):
    """``start()`` sets logging up as the ``clipheads`` command does (a stderr handler on a root logger without
    others) and returns capsys, whose stderr the handler writes to; all is put back afterwards."""
    import transformers

    from clipheads.cli import configure_logging

    root, ours = logging.getLogger(), logging.getLogger("clipheads")
    saved = root.handlers[:], root.level, ours.level, transformers.utils.logging.get_verbosity()

    def start():
        root.handlers.clear()
        configure_logging()
        return capsys

    yield start
    handlers, level, our_level, verbosity = saved
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)
    transformers.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.enable_progress_bar()


def test_cli_logging_shows_clipheads_warnings_and_quiets_other_libraries(cli_logging):
    captured = cli_logging()
    logging.getLogger("open_clip").warning("third-party warning")
    logging.getLogger("httpx").warning("httpx warning")
    logging.getLogger("clipheads.data.folder").warning("skipping broken.png")
    logging.getLogger("clipheads.explain").info("an info line")
    assert captured.readouterr().err.splitlines() == ["WARNING clipheads.data.folder: skipping broken.png"]


def test_cli_shows_retry_warnings_and_keeps_the_key_out(server, tmp_path, cli_logging, monkeypatch):
    """``clipheads ccs --judge llm``: the retry is a WARNING line on stderr, the key is nowhere."""
    from typer.testing import CliRunner

    from clipheads.cli import app
    from clipheads.explain.textspan import HeadDescription, TextSpanResult
    from clipheads.models.random_init import random_hf_clip, save_hf

    save_hf(random_hf_clip("tiny"), tmp_path / "model")
    TextSpanResult([HeadDescription(1, 0, TEXTS, [0.2] * 5, 1.0), HeadDescription(1, 1, TEXTS[::-1], [0.2] * 5, 1.0)],
                   k=5, rank=8, n_images=10, n_texts=100).save(tmp_path / "descriptions.json")
    server.script = lambda body, n: (503, b"busy", 0, {"Retry-After": "0"}) if n == 1 else Server.answer(body, n)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    captured = cli_logging()
    result = CliRunner().invoke(app, ["ccs", "--model", str(tmp_path / "model"), "--descriptions",
                                      str(tmp_path / "descriptions.json"), "--judge", "llm", "--llm-base-url",
                                      server.url, "--llm-model", "test-model", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    stderr = captured.readouterr().err
    assert "WARNING clipheads.explain.judges: LLM judge test-model: attempt 1/4 HTTP 503 (Retry-After 0 s)" in stderr
    assert json.loads((tmp_path / "ccs.json").read_text())["judges"] == ["llm:test-model"]
    assert server.connections == 1 and len(server.requests) == 5  # 2 heads x (label, judgement) + 1 retry
    assert not any(KEY in text for text in (result.output, stderr, *(p.read_text() for p in tmp_path.glob("*.json"))))
