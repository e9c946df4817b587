"""The embedded ``reference`` serve engine: an OpenAI-compatible server over a checkpoint, torch on CPU.

It exists so a day-0 run needs no GPU and no vLLM: the candidate's quantized numerics are emulated by
:mod:`pytest_day0.serving.dequant`, and the responses have the shapes vLLM returns, so the scorer cannot tell
the engines apart. Correctness over speed: one worker owns the model and runs one unit of work at a time, a
plain greedy (or seeded sampling) loop over the HF model's KV cache. The two request shapes a scorer sends by the
thousand (echo scoring with max_tokens=0, and greedy generation) are batched: those that queued while a forward
ran go together as one padded forward, equal to their one-at-a-time answers up to float rounding.

Run as ``python -m pytest_day0.serving.reference_server --checkpoint DIR --served-model-name NAME
--host 127.0.0.1 --port 0 --ready-file PATH``. It binds loopback only unless ``--allow-remote-bind``: the
server has no authentication and executes arbitrary prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import sys
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pytest_day0.failures import Day0Error
from pytest_day0.serving import LOOPBACK_HOSTS, REFERENCE_MAX_BATCH

MAX_LOGPROBS = 20
MAX_N = 16
DEFAULT_MAX_TOKENS_UNBOUNDED = 256  # when the config states no context length
LOG_PREFIX = "day0-reference:"
# Sampling knobs the reference engine does not implement, with the value that means "off".
UNSUPPORTED_NEUTRAL: dict[str, Any] = {
    "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": {}, "best_of": 1,
    "suffix": "", "min_tokens": 0, "use_beam_search": False,
}


class ApiError(Exception):
    """A request the server refuses; rendered as OpenAI's ``{"error": {...}}`` with this status."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status)


# ---------------------------------------------------------------- request parsing (pure)


@dataclass
class SamplingParams:
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k alternatives to report per position; None = no logprobs
    n: int = 1


@dataclass
class CompletionParams:
    prompts: list[str | list[int]]
    echo: bool
    sampling: SamplingParams


@dataclass
class ChatParams:
    messages: list[dict[str, Any]]
    sampling: SamplingParams
    want_logprobs: bool


def _get(body: dict[str, Any], key: str, types: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{key}' must be {_type_names(types)}, got a boolean", param=key)
    if not isinstance(value, types):
        raise ApiError(400, f"'{key}' must be {_type_names(types)}, got {type(value).__name__}", param=key)
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def check_model(body: dict[str, Any], served_name: str) -> None:
    """vLLM answers a request for a model it does not serve with 404; a missing name means ours."""
    model = body.get("model")
    if model is not None and model != served_name:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")


def parse_sampling(body: dict[str, Any], default_max_tokens: int | None, chat: bool) -> SamplingParams:
    if body.get("stream"):
        raise ApiError(400, "streaming is not supported by the reference engine", param="stream")
    for key, neutral in UNSUPPORTED_NEUTRAL.items():  # refuse rather than silently answer something else
        if body.get(key) not in (None, neutral):
            raise ApiError(400, f"'{key}' is not supported by the reference engine (only {neutral!r})", param=key)
    max_tokens = _get(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                      int, default_max_tokens)
    if max_tokens is not None and max_tokens < 0:
        raise ApiError(400, f"max_tokens must be at least 0, got {max_tokens}", param="max_tokens")
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    if not 0.0 <= temperature <= 2.0 or math.isnan(temperature):
        raise ApiError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = _get(body, "top_k", int, -1)
    seed = _get(body, "seed", int, None)
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: list[str] = []
    elif isinstance(stop_raw, str):
        stop = [stop_raw]
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = list(stop_raw)
    else:
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    stop = [s for s in stop if s]
    stop_token_ids = _get(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise ApiError(400, "'stop_token_ids' must be a list of integers", param="stop_token_ids")
    n = _get(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be in [1, {MAX_N}], got {n}", param="n")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          stop=stop, stop_token_ids=list(stop_token_ids),
                          ignore_eos=bool(_get(body, "ignore_eos", bool, False)), n=n)


def parse_completion(body: dict[str, Any]) -> CompletionParams:
    """The prompt forms OpenAI accepts: str, list[int], list[str], list[list[int]]."""
    prompt = body.get("prompt")
    prompts: list[str | list[int]]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif (isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt)):
        prompts = [list(p) for p in prompt]
    else:
        raise ApiError(400, "'prompt' must be a string, a list of token ids, a list of strings or a list of "
                            "token-id lists (non-empty)", param="prompt")
    sampling = parse_sampling(body, 16, chat=False)
    echo = bool(_get(body, "echo", bool, False))
    logprobs = _get(body, "logprobs", int, None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
    sampling.logprobs = logprobs
    if sampling.max_tokens == 0 and not echo:
        raise ApiError(400, "max_tokens must be at least 1 unless echo is set", param="max_tokens")
    return CompletionParams(prompts=prompts, echo=echo, sampling=sampling)


def parse_chat(body: dict[str, Any]) -> ChatParams:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            m["content"] = "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, "message 'content' must be a string or a list of text parts", param="messages")
    sampling = parse_sampling(body, None, chat=True)
    if sampling.max_tokens == 0:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    want = bool(_get(body, "logprobs", bool, False))
    top = _get(body, "top_logprobs", int, None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs")
    if top is not None and not want:
        raise ApiError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    sampling.logprobs = (top or 0) if want else None
    return ChatParams(messages=messages, sampling=sampling, want_logprobs=want)


# ---------------------------------------------------------------- generation


@dataclass
class StepLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-k alternatives, best first


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    stop_reason: str | int | None
    logprobs: list[StepLogprobs]


class Engine:
    """The model, its tokenizer and the decode loop; not thread-safe, callers hold the server's lock."""

    def __init__(self, model: Any, tokenizer: Any, max_len: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.vocab_size = int(model.config.vocab_size)
        self.eos_ids = self._eos_ids()
        self._token_text: dict[int, str] = {}

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), getattr(self.model.config, "eos_token_id", None),
                       getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    def token_text(self, token_id: int) -> str:
        if token_id not in self._token_text:
            self._token_text[token_id] = self.tokenizer.decode([token_id])
        return self._token_text[token_id]

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                               param="prompt")
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        if self.max_len and len(ids) > self.max_len:
            raise ApiError(400, f"This model's maximum context length is {self.max_len} tokens. However, your "
                                f"prompt has {len(ids)} tokens.", param="prompt")
        return ids

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja errors: the request's messages do not fit the template
            raise ApiError(400, f"chat template failed: {exc}", param="messages") from exc
        # the template writes its own special tokens (bos); adding them again would double them, as vLLM avoids
        return self.encode(str(text), add_special_tokens=False)

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], k: int | None) -> tuple[list[StepLogprobs | None], torch.Tensor, Any]:
        """Forward the prompt once: per-position logprobs of the prompt tokens, last logits, KV cache."""
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        logits = out.logits[0].float()
        steps: list[StepLogprobs | None] = [None]
        if k is not None and len(ids) > 1:
            logp = torch.log_softmax(logits[:-1], dim=-1)
            for pos in range(1, len(ids)):
                steps.append(_step(logp[pos - 1], ids[pos], k))
        return steps, logits[-1], out.past_key_values

    def _budget(self, ids: list[int], params: SamplingParams) -> int:
        if params.max_tokens is not None:
            budget = params.max_tokens
        else:  # OpenAI chat default: as much as the context allows
            budget = self.max_len - len(ids) if self.max_len else DEFAULT_MAX_TOKENS_UNBOUNDED
        if self.max_len:
            budget = min(budget, self.max_len - len(ids))  # RoPE past the trained length is not the model
        return budget

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)

    def _stopped(self, generated: list[int], stop_ids: set[int],
                 params: SamplingParams) -> tuple[str | int | None, str | None] | None:
        """After appending a token: (stop_reason, text cut at a stop string) when decoding ends here, else None.
        One rule for the single and the batched loop, so batching cannot change where an answer stops."""
        token = generated[-1]
        if token in stop_ids:
            return (None if token in self.eos_ids else token), None
        if params.stop:
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            hit = _first_stop(text, params.stop)
            if hit is not None:  # the stop string is not part of the output, as in vLLM
                return hit[1], text[: hit[0]]
        return None

    @torch.inference_mode()
    def generate(self, ids: list[int], params: SamplingParams, first: tuple[torch.Tensor, Any] | None = None,
                 generator: torch.Generator | None = None) -> Generation:
        budget = self._budget(ids, params)
        stop_ids = self._stop_ids(params)
        if first is None:
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            logits, past = out.logits[0, -1].float(), out.past_key_values
        else:
            logits, past = first
        generated: list[int] = []
        steps: list[StepLogprobs] = []
        finish: str = "length"
        stop_reason: str | int | None = None
        stopped_text: str | None = None
        while len(generated) < budget:
            token = self._pick(logits, params, generator)
            generated.append(token)
            if params.logprobs is not None:
                steps.append(_step(torch.log_softmax(logits, dim=-1), token, params.logprobs))
            stopped = self._stopped(generated, stop_ids, params)
            if stopped is not None:
                finish, (stop_reason, stopped_text) = "stop", stopped
                break
            if len(generated) >= budget:
                break
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1].float(), out.past_key_values
        text = stopped_text if stopped_text is not None else self.tokenizer.decode(generated, skip_special_tokens=True)
        return Generation(generated, text, finish, stop_reason, steps)

    @torch.inference_mode()
    def score_batch(self, batch: Sequence[tuple[list[int], int | None]]) -> list[list[StepLogprobs | None]]:
        """Prompt logprobs of several prompts in one right-padded forward (echo scoring, nothing generated).

        Right padding keeps every row's positions 0..n-1 and, under the causal mask, a real token never sees a
        pad, so each row computes what its own forward would (to float rounding; the batching test bounds it)."""
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        results: list[list[StepLogprobs | None]] = []
        for row, (ids, k) in enumerate(batch):
            steps: list[StepLogprobs | None] = [None]
            if k is not None and len(ids) > 1:
                logp = torch.log_softmax(logits[row, : len(ids) - 1], dim=-1)
                steps.extend(_step(logp[pos - 1], ids[pos], k) for pos in range(1, len(ids)))
            results.append(steps)
        return results

    @torch.inference_mode()
    def generate_greedy_batch(self, batch: Sequence[tuple[list[int], SamplingParams]]) -> list[Generation]:
        """Greedy decoding of several prompts at once: left-padded, explicit positions, one shared KV cache.

        Each row keeps its own budget, stop ids and stop strings; a finished row rides along (its tokens are
        discarded) so the batch stays rectangular. Only temperature-0 requests come here: argmax needs no
        generator, so batching cannot change which random numbers a request sees."""
        n = len(batch)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        budgets: list[int] = []
        stop_ids: list[set[int]] = []
        for row, (ids, params) in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
            budgets.append(self._budget(ids, params))
            stop_ids.append(self._stop_ids(params))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits, past = out.logits[:, -1].float(), out.past_key_values
        next_pos = positions[:, -1:] + 1
        generated: list[list[int]] = [[] for _ in batch]
        steps: list[list[StepLogprobs]] = [[] for _ in batch]
        finish = ["length"] * n
        stop_reason: list[str | int | None] = [None] * n
        stopped_text: list[str | None] = [None] * n
        active = [budgets[row] > 0 for row in range(n)]
        while any(active):
            tokens = torch.argmax(logits, dim=-1).tolist()
            for row, (_, params) in enumerate(batch):
                if not active[row]:
                    continue
                token = int(tokens[row])
                generated[row].append(token)
                if params.logprobs is not None:
                    steps[row].append(_step(torch.log_softmax(logits[row], dim=-1), token, params.logprobs))
                stopped = self._stopped(generated[row], stop_ids[row], params)
                if stopped is not None:
                    finish[row], (stop_reason[row], stopped_text[row]) = "stop", stopped
                    active[row] = False
                if len(generated[row]) >= budgets[row]:
                    active[row] = False
            if not any(active):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
            out = self.model(input_ids=torch.tensor(tokens).unsqueeze(1), attention_mask=mask, position_ids=next_pos,
                             past_key_values=past, use_cache=True)
            logits, past = out.logits[:, -1].float(), out.past_key_values
            next_pos = next_pos + 1
        results: list[Generation] = []
        for row in range(n):
            text = stopped_text[row]
            if text is None:
                text = self.tokenizer.decode(generated[row], skip_special_tokens=True)
            results.append(Generation(generated[row], text, finish[row], stop_reason[row], steps[row]))
        return results

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
        if params.temperature <= 0.0:
            return int(torch.argmax(logits).item())
        scaled = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
            scaled = torch.where(scaled < kth, torch.full_like(scaled, -math.inf), scaled)
        probs = torch.softmax(scaled, dim=-1)
        if params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=0) - sorted_p < params.top_p
            mask = torch.zeros_like(probs, dtype=torch.bool)
            mask[order[keep]] = True
            probs = torch.where(mask, probs, torch.zeros_like(probs))
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=generator).item())


def _step(logp: torch.Tensor, token: int, k: int) -> StepLogprobs:
    top: list[tuple[int, float]] = []
    if k > 0:
        values, indices = torch.topk(logp, min(k, logp.numel()))
        top = [(int(i), float(v)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    return StepLogprobs(token, float(logp[token].item()), top)


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string in ``text`` (its position and which), or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        pos = text.find(s)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


def _clip(lp: float) -> float:
    return max(lp, -9999.0)  # vLLM clips -inf the same way: JSON has no infinity


def completion_logprobs(
    engine: Engine, steps: Sequence[StepLogprobs | None], token_ids: Sequence[int]
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object; top_logprobs holds the top-k plus the chosen token."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0
    for tid, step in zip(token_ids, steps, strict=True):
        text = engine.token_text(tid)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if step is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_clip(step.logprob))
        entry: dict[str, float] = {}
        for i, lp in step.top:  # ids that decode alike (unused vocab rows) keep the likeliest
            entry.setdefault(engine.token_text(i), _clip(lp))
        entry.setdefault(text, _clip(step.logprob))
        top_logprobs.append(entry)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(engine: Engine, steps: Sequence[StepLogprobs]) -> dict[str, Any]:
    def item(tid: int, lp: float) -> dict[str, Any]:
        text = engine.token_text(tid)
        return {"token": text, "logprob": _clip(lp), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(s.token_id, s.logprob), "top_logprobs": [item(i, lp) for i, lp in s.top]}
                        for s in steps]}


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else secrets.randbits(62))
    return g


def _completion_choice(engine: Engine, params: CompletionParams, index: int, prompt: str | list[int], ids: list[int],
                       prompt_steps: Sequence[StepLogprobs | None], gen: Generation) -> dict[str, Any]:
    sp = params.sampling
    prompt_text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)
    text = (prompt_text + gen.text) if params.echo else gen.text
    logprobs = None
    if sp.logprobs is not None:
        if params.echo:
            logprobs = completion_logprobs(engine, [*prompt_steps, *gen.logprobs], [*ids, *gen.token_ids])
        else:
            logprobs = completion_logprobs(engine, gen.logprobs, gen.token_ids)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": gen.finish_reason,
            "stop_reason": gen.stop_reason}


def _completion_body(model_name: str, choices: list[dict[str, Any]], prompt_tokens: int,
                     completion_tokens: int) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def run_completion(engine: Engine, params: CompletionParams, model_name: str) -> dict[str, Any]:
    sp = params.sampling
    generator = _generator(sp.seed)
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = 0
    for p_index, prompt in enumerate(params.prompts):
        ids = engine.encode(prompt)
        prompt_tokens += len(ids)
        want_prompt_lp = params.echo and sp.logprobs is not None
        prompt_steps, last, past = engine.prompt_logprobs(ids, sp.logprobs if want_prompt_lp else None)
        for j in range(sp.n):
            if sp.max_tokens == 0:
                gen = Generation([], "", "length", None, [])
            else:
                # the first choice reuses the prompt pass; the KV cache is extended in place, so later ones redo it
                first = (last, past) if j == 0 else None
                gen = engine.generate(ids, sp, first, generator)
            completion_tokens += len(gen.token_ids)
            choices.append(_completion_choice(engine, params, p_index * sp.n + j, prompt, ids, prompt_steps, gen))
    return _completion_body(model_name, choices, prompt_tokens, completion_tokens)


# ---------------------------------------------------------------- dynamic batching (pure decision + batch runner)

SCORE = "score"  # echo, max_tokens=0: one forward, prompt logprobs only (the scorer's loglikelihood requests)
GREEDY = "greedy"  # temperature 0, no echo: batched greedy decode


def batch_kind(params: CompletionParams) -> str | None:
    """Which batch a completion request may join, or None for the one-at-a-time path.

    Only the two shapes a scorer sends by the thousand are batched; anything unusual (several prompts, n > 1,
    sampling, echo with generation) keeps the plain loop, whose behaviour the rest of the tests pin down."""
    sp = params.sampling
    if len(params.prompts) != 1 or sp.n != 1:
        return None
    if params.echo:
        return SCORE if sp.max_tokens == 0 else None
    if sp.temperature == 0.0 and sp.max_tokens is not None and sp.max_tokens > 0:
        return GREEDY
    return None


def run_completion_batch(engine: Engine, kind: str, batch: Sequence[CompletionParams],
                         model_name: str) -> list[dict[str, Any] | ApiError]:
    """Answer every request of one batch; a request that cannot be encoded gets its own error, not the batch."""
    results: list[dict[str, Any] | ApiError] = []
    encoded: list[tuple[int, list[int]]] = []
    for i, params in enumerate(batch):
        try:
            encoded.append((i, engine.encode(params.prompts[0])))
            results.append({})
        except ApiError as err:
            results.append(err)
    if not encoded:
        return results
    empty = Generation([], "", "length", None, [])
    if kind == SCORE:
        all_steps = engine.score_batch([(ids, batch[i].sampling.logprobs) for i, ids in encoded])
        outcomes = [(steps, empty) for steps in all_steps]
    else:
        gens = engine.generate_greedy_batch([(ids, batch[i].sampling) for i, ids in encoded])
        outcomes = [([], gen) for gen in gens]
    for (i, ids), (steps, gen) in zip(encoded, outcomes, strict=True):
        params = batch[i]
        choice = _completion_choice(engine, params, 0, params.prompts[0], ids, steps, gen)
        results[i] = _completion_body(model_name, [choice], len(ids), len(gen.token_ids))
    return results


def run_chat(engine: Engine, params: ChatParams, model_name: str) -> dict[str, Any]:
    sp = params.sampling
    generator = _generator(sp.seed)
    ids = engine.chat_prompt(params.messages)
    choices: list[dict[str, Any]] = []
    completion_tokens = 0
    for j in range(sp.n):
        gen = engine.generate(ids, sp, None, generator)
        completion_tokens += len(gen.token_ids)
        choices.append({"index": j, "message": {"role": "assistant", "content": gen.text},
                        "logprobs": chat_logprobs(engine, gen.logprobs) if params.want_logprobs else None,
                        "finish_reason": gen.finish_reason, "stop_reason": gen.stop_reason})
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens}}


MAX_BATCH = REFERENCE_MAX_BATCH
MAX_BATCH_TOKENS = 16384  # prompt + generation positions in one batch: bounds the padded forward's memory
LOGITS_BUDGET = 2**28  # float32 logits of one batch (positions x vocab, 1 GiB): a 150k vocabulary gets 1,789 positions


@dataclass
class _Job:
    future: asyncio.Future[Any]
    kind: str | None  # SCORE / GREEDY, or None: run ``call`` alone
    params: CompletionParams | None = None
    call: Callable[[], Any] | None = None
    size: int = 0  # positions it may occupy (prompt characters or ids + max_tokens): the token-budget estimate


def take_batch(queue: deque[_Job], max_batch: int = MAX_BATCH, max_tokens: int = MAX_BATCH_TOKENS) -> list[_Job]:
    """The next unit of work: the head job, plus, when it is batchable, every waiting job of its kind that fits.

    The head always runs, so an odd request is never starved by a stream of batchable ones; jobs left behind
    keep their order. Jobs whose client went away (future cancelled) are dropped here."""
    while queue and queue[0].future.done():
        queue.popleft()
    if not queue:
        return []
    head = queue.popleft()
    batch = [head]
    if head.kind is None:
        return batch
    used = head.size
    kept: deque[_Job] = deque()
    while queue:
        job = queue.popleft()
        if job.future.done():
            continue
        if job.kind == head.kind and len(batch) < max_batch and used + job.size <= max_tokens:
            batch.append(job)
            used += job.size
        else:
            kept.append(job)
    queue.extend(kept)
    return batch


class EngineWorker:
    """The engine's only user: requests queue jobs, one task runs them on a thread, batching what waits together.

    Requests that arrive while a forward is running are what concurrency 64 produces; running them as one padded
    forward is what turns the queue into throughput (vLLM's continuous batching, in its simplest form)."""

    def __init__(self, engine: Engine, model_name: str, max_batch: int = MAX_BATCH) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_tokens = max(1, min(MAX_BATCH_TOKENS, LOGITS_BUDGET // max(1, engine.vocab_size)))
        self._queue: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # units of work run, for the log and the tests
        self.largest_batch = 0

    async def run_alone(self, call: Callable[[], Any]) -> Any:
        return await self._submit(_Job(asyncio.get_running_loop().create_future(), None, call=call))

    async def completion(self, params: CompletionParams) -> dict[str, Any]:
        kind = batch_kind(params) if self.max_batch > 1 else None
        if kind is None:
            return dict(await self.run_alone(lambda: run_completion(self.engine, params, self.model_name)))
        prompt = params.prompts[0]
        size = len(prompt) + 1 + (params.sampling.max_tokens or 0)
        return dict(await self._submit(_Job(asyncio.get_running_loop().create_future(), kind, params, size=size)))

    async def _submit(self, job: _Job) -> Any:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._queue.append(job)
        self._wake.set()
        return await job.future

    async def _loop(self) -> None:
        while True:
            batch = take_batch(self._queue, self.max_batch, self.max_tokens)
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results = await run_in_threadpool(self._execute, batch)
            except Exception as exc:  # every waiting request gets the failure; the worker lives on
                if not isinstance(exc, ApiError):
                    traceback.print_exc()
                results = [exc] * len(batch)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _execute(self, batch: list[_Job]) -> list[Any]:
        head = batch[0]
        if head.kind is None:
            assert head.call is not None
            return [head.call()]
        params = [job.params for job in batch if job.params is not None]
        return list(run_completion_batch(self.engine, head.kind, params, self.model_name))


# ---------------------------------------------------------------- HTTP


def create_app(engine: Engine, served_model_name: str, root: str = "", max_batch: int = MAX_BATCH) -> Starlette:
    worker = EngineWorker(engine, served_model_name, max_batch)
    created = int(time.time())

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def models(_: Request) -> JSONResponse:
        card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "pytest-day0",
                "root": root or served_model_name, "parent": None, "max_model_len": engine.max_len or None}
        return JSONResponse({"object": "list", "data": [card]})

    async def _body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        check_model(body, served_model_name)
        return body

    async def completions(request: Request) -> Response:
        try:
            params = parse_completion(await _body(request))
            result = await worker.completion(params)
            return JSONResponse(result)
        except ApiError as err:
            return err.response()
        except Exception:  # a bug, not a bad request: say so, keep serving
            traceback.print_exc()
            return ApiError(500, "internal error in the reference engine", "InternalServerError").response()

    async def chat(request: Request) -> Response:
        try:
            params = parse_chat(await _body(request))
            result = await worker.run_alone(lambda: run_chat(engine, params, served_model_name))
            return JSONResponse(result)
        except ApiError as err:
            return err.response()
        except Exception:
            traceback.print_exc()
            return ApiError(500, "internal error in the reference engine", "InternalServerError").response()

    return Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ])


def write_ready_file(path: Path, payload: dict[str, Any]) -> None:
    """Atomic: the waiting stage must never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def default_threads(model: Any) -> int:
    """Tiny models run fastest single-threaded: a 3 ms forward becomes 30 ms with 2 contended threads."""
    n_params = sum(p.numel() for p in model.parameters())
    return 1 if n_params < 50_000_000 else min(8, os.cpu_count() or 1)


def _port(text: str) -> int:
    """A port uvicorn can bind: out of range it would die with a traceback (OverflowError) instead of one line."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pytest_day0.serving.reference_server", description=__doc__)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--served-model-name", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=_port, default=0, help="0 = pick a free port (see --ready-file)")
    ap.add_argument("--ready-file", type=Path, default=None, help="JSON {url, port, pid} written once listening")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads; default 1 below 50M parameters (thread overhead dominates), "
                         "else up to 8")
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH,
                    help="most waiting scoring (echo) or greedy requests run as one forward; 1 = one at a time")
    ap.add_argument("--allow-remote-bind", action="store_true",
                    help="allow a non-loopback --host (the server has no authentication)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from pytest_day0.serving.dequant import load_checkpoint

    args = parse_args(argv)
    if args.host not in LOOPBACK_HOSTS and not args.allow_remote_bind:
        print(f"{LOG_PREFIX} refusing to bind {args.host!r}: loopback only (127.0.0.1, ::1) unless "
              "--allow-remote-bind", file=sys.stderr, flush=True)
        return 2
    try:
        loaded = load_checkpoint(args.checkpoint)
    except Day0Error as err:
        print(f"{LOG_PREFIX} load failed: {err}", file=sys.stderr, flush=True)
        return 3
    torch.set_num_threads(max(1, args.threads or default_threads(loaded.model)))
    print(f"{LOG_PREFIX} loaded {args.checkpoint} quant_algo={loaded.quant_algo} "
          f"quantized_linears={len(loaded.layers)} formats={sorted(set(loaded.layers.values()))} "
          f"not_emulated={loaded.ignored_tensors}", flush=True)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.max_len)
    app = create_app(engine, args.served_model_name, str(args.checkpoint), max_batch=max(1, args.max_batch))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_keep_alive=30, backlog=256)
    ready_file: Path | None = args.ready_file
    host: str = args.host
    name: str = args.served_model_name

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.should_exit:
                return
            port = int(self.servers[0].sockets[0].getsockname()[1])
            payload = {"url": _url(host, port), "port": port, "pid": os.getpid(), "host": host, "model": name}
            print(f"{LOG_PREFIX} listening on {payload['url']} as {name!r}", flush=True)
            if ready_file is not None:
                write_ready_file(ready_file, payload)

    _Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
