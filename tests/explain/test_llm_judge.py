"""The LLM judge against a local server that speaks the chat-completions wire format."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clipheads.explain.concepts import concept_consistency
from clipheads.explain.judges import JudgeError, LLMJudge

KEY = "sk-test-secret-0123456789"


class Server:
    """A chat-completions endpoint on 127.0.0.1; ``script`` returns (status, content or raw body, delay)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.script = self.answer
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content, delay = outer.script(body, len(outer.requests))
                time.sleep(delay)
                reply = content if status != 200 or isinstance(content, bytes) else json.dumps(
                    {"id": "x", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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
