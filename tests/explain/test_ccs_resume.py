"""``clipheads ccs`` resumes ``ccs_progress.json`` only for the same judging: another threshold or another LLM
endpoint serving the same model name is refused with exit code 2 and one line naming the change."""

from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from clipheads.cli import main
from clipheads.models.random_init import random_hf_clip, save_hf


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """A tiny model and the descriptions.json of its layer 1 (k = 3)."""
    root = tmp_path_factory.mktemp("ccs_resume")
    save_hf(random_hf_clip("tiny"), root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    code, _, err = _cli("describe", "--model", root / "model", "--data", root / "images", "--k", 3, "--layers", 1,
                        "--batch-size", 6, "--out", root / "described")
    assert code == 0, err
    return root


def _cli(*args) -> tuple[int, str, str]:
    """The console script (``clipheads.cli.main``) with captured output: exit code, stdout, stderr."""
    import contextlib
    import io

    argv, level = sys.argv, logging.getLogger().level
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["clipheads", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = argv
        logging.getLogger().setLevel(level)
    return code, out.getvalue(), err.getvalue()


def _refused(*args) -> str:
    code, out, err = _cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert "Traceback" not in out + err
    return lines[0]


def _without_run_time(path):
    """A CCS result without the time it was written (meta.run.written: the two runs may straddle a second)."""
    data = json.loads(path.read_text())
    data["meta"].get("run", {}).pop("written", None)
    return data


def ccs_args(root, out, *judging):
    return ["ccs", "--model", root / "model", "--descriptions", root / "described" / "descriptions.json", *judging,
            "--out", out]


def test_an_unchanged_rerun_resumes_and_another_threshold_is_refused(described, tmp_path):
    args = ccs_args(described, tmp_path, "--judge", "clip", "--threshold", 0.05)
    code, _, err = _cli(*args)
    assert code == 0, err
    first = _without_run_time(tmp_path / "ccs.json")
    assert json.loads((tmp_path / "ccs_progress.json").read_text())["run_key"]["inputs"]["weights"]["n_bytes"] > 0
    code, _, err = _cli(*args)
    assert code == 0, err
    assert _without_run_time(tmp_path / "ccs.json") == first

    line = _refused(*ccs_args(described, tmp_path, "--judge", "clip", "--threshold", 0.2))
    assert "--threshold of the clip judge changed from 0.05 to 0.2" in line
    assert _without_run_time(tmp_path / "ccs.json") == first  # the old CCS is neither returned nor overwritten


class _Endpoint:
    """A chat-completions server on 127.0.0.1 that labels every head "colours" and calls every text consistent."""

    def __init__(self) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                prompt = body["messages"][-1]["content"]
                n_texts = sum(1 for line in prompt.splitlines() if line[:1].isdigit())
                verdict = json.dumps({"consistent": [True] * n_texts})
                content = '{"label": "colours"}' if '"label"' in prompt else verdict
                reply = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_another_endpoint_serving_the_same_model_name_is_refused(described, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    first, second = _Endpoint(), _Endpoint()
    try:
        code, _, err = _cli(*ccs_args(described, tmp_path, "--judge", "llm", "--llm-base-url", first.url,
                                      "--llm-model", "judge-1"))
        assert code == 0, err
        assert first.requests == 8  # 4 heads: a label and a verdict each
        line = _refused(*ccs_args(described, tmp_path, "--judge", "llm", "--llm-base-url", second.url,
                                  "--llm-model", "judge-1"))
        assert f"--llm-base-url of the llm:judge-1 judge changed from {first.url} to {second.url}" in line
        assert second.requests == 0
        code, _, err = _cli(*ccs_args(described, tmp_path, "--judge", "llm", "--llm-base-url", first.url + "/",
                                      "--llm-model", "judge-1"))  # the same endpoint: resumed, nothing asked again
        assert code == 0, err
        assert first.requests == 8
    finally:
        first.close()
        second.close()
