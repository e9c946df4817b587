"""The lm-eval worker: the child process that holds lm-eval-harness for the ``lm-eval`` eval engine.

    python -m pytest_day0.stages.lm_eval_worker plan    one JSON request on stdin -> one result line (and exit)
    python -m pytest_day0.stages.lm_eval_worker serve   one JSON job per stdin line -> one result line per job

Why a child (and a long-lived one): lm-eval seeds the global random generators, configures logging and keeps
datasets, tokenizers and its task index in memory; a child keeps all of that out of the pytest process, and its
process group can be killed at the stage deadline and on Ctrl-C/SIGTERM. Importing lm-eval and indexing its ~15k
task YAMLs costs seconds (25 s measured on a busy 2-core machine), so one worker per pytest process serves every
(side, task) job in turn: that cost is paid once per process, not once per task.

Result lines go to the original stdout, prefixed ``DAY0_LMEVAL ``; everything else (lm-eval's logging, its tqdm
progress bars, stray prints) goes to stderr, which the parent reads for progress and for the log tail of a
failure. A failure is classified here, where the exception is known: USER_CONFIG_ERROR (unknown task, a dataset
neither cached nor reachable), INFRA_TRANSIENT (the endpoint: refused, reset, timed out, 5xx, 429),
EVAL_JUDGE_FAILED (anything else that stops lm-eval from scoring the task: a 4xx, an answer it cannot parse).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROTO = "DAY0_LMEVAL "
log = logging.getLogger("pytest_day0.lm_eval_worker")


class JobError(Exception):
    """A classified failure: the parent raises Day0Error(failure_class, message). ``needs_index``: resolving
    from the included folders alone failed in a way lm-eval's full task index may fix."""

    def __init__(self, failure_class: str, message: str, needs_index: bool = False) -> None:
        super().__init__(message)
        self.failure_class = failure_class
        self.message = " ".join(message.split())
        self.needs_index = needs_index


class DatasetUnavailable(Exception):
    def __init__(self, task: str, path: str | None, name: str | None, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.task, self.path, self.name, self.cause = task, path, name, cause


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


# ---------------------------------------------------------------------- datasets


_UNREACHABLE = ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
                "FileNotFoundError", "HfHubHTTPError", "GatedRepoError", "RepositoryNotFoundError")


def _guard_downloads() -> None:
    """Name the task and the dataset when lm-eval cannot load one (its own error names neither the task nor how
    to fix it)."""
    from lm_eval.api.task import ConfigurableTask

    original = ConfigurableTask.download
    if getattr(original, "day0_guard", False):
        return

    def download(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        except Exception as exc:
            cfg = self.config
            raise DatasetUnavailable(str(cfg.task), cfg.dataset_path, cfg.dataset_name, exc) from exc

    download.day0_guard = True  # type: ignore[attr-defined]
    ConfigurableTask.download = download  # type: ignore[method-assign]


def _dataset_error(exc: DatasetUnavailable) -> JobError:
    cause_chain: list[str] = []
    cause: BaseException | None = exc.cause
    while cause is not None and len(cause_chain) < 6:
        cause_chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    dataset = exc.path or "(custom dataset)"
    if exc.name:
        dataset += f" ({exc.name})"
    if any(name in _UNREACHABLE for name in cause_chain) or "Couldn't reach" in str(exc.cause):
        args = ", ".join(repr(a) for a in (exc.path, exc.name) if a)
        fix = f"python -c \"import datasets; datasets.load_dataset({args})\"" if exc.path else \
            "run it once where its data can be read"
        return JobError("USER_CONFIG_ERROR", f"lm-eval task {exc.task}: dataset {dataset} is neither cached nor "
                        f"reachable ({_one_line(exc.cause, 160)}); cache it on a machine with hub access: {fix} "
                        "(gated datasets also need HF_TOKEN)")
    return JobError("USER_CONFIG_ERROR", f"lm-eval task {exc.task}: dataset {dataset} cannot be loaded: "
                    f"{_one_line(exc.cause)}")


# ---------------------------------------------------------------------- tasks


class Caches:
    """What one worker process keeps between jobs: task indexes, loaded tasks (datasets), models, tokenizers."""

    def __init__(self) -> None:
        self.managers: dict[tuple[tuple[str, ...], bool], Any] = {}
        self.loaded: dict[str, Any] = {}
        self.lms: dict[str, Any] = {}
        self.tokenizers: dict[str, Any] = {}

    def manager(self, include: Sequence[str], defaults: bool) -> Any:
        from lm_eval.tasks import TaskManager

        key = (tuple(include), defaults)
        if key not in self.managers:
            started = time.time()
            self.managers[key] = TaskManager(include_path=list(include) or None, include_defaults=defaults)
            log.info("day0: lm-eval task index (%s) built in %.1fs",
                     "lm-eval's tasks + includes" if defaults else "includes only", time.time() - started)
        return self.managers[key]

    def tokenizer(self, path: str) -> Any:
        if path not in self.tokenizers:
            import transformers

            self.tokenizers[path] = transformers.AutoTokenizer.from_pretrained(path)
        return self.tokenizers[path]

    def lm(self, kind: str, args: dict[str, Any]) -> Any:
        import lm_eval.api.registry
        import lm_eval.models

        key = kind + json.dumps(args, sort_keys=True, default=str)
        if key not in self.lms:
            self.lms[key] = lm_eval.api.registry.get_model(kind).create_from_arg_obj(args, {"batch_size": 1})
        return self.lms[key]


def _request_spec(name: str, num_fewshot: int | None) -> Any:
    """A requested name as lm-eval's loader takes it: a per-task few-shot count is an override dict."""
    if num_fewshot is None:
        return name
    return {"task": name, "num_fewshot": num_fewshot}


def _load(manager: Any, name: str, num_fewshot: int | None) -> dict[str, Any]:
    spec = _request_spec(name, num_fewshot)
    try:
        loaded: dict[str, Any] = manager.load([spec])
    except DatasetUnavailable as exc:
        error = _dataset_error(exc)
        error.needs_index = "::" in exc.task  # an inline task lm-eval made of a name the folders lack
        raise error from exc
    except KeyError as exc:
        known = list(manager.all_tasks)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise JobError("USER_CONFIG_ERROR", f"lm-eval has no task, group or tag named {name!r}{hint}; "
                       "add your own with --day0-lm-eval-include DIR", needs_index=True) from exc
    if not loaded["tasks"]:
        raise JobError("USER_CONFIG_ERROR", f"lm-eval name {name!r} selects no task")
    return loaded


def _apply_settings(loaded: dict[str, Any], num_fewshot: int | None, gen_kwargs: dict[str, Any] | None) -> None:
    """What lm-eval's simple_evaluate does to loaded tasks before evaluating (lm_eval/evaluator.py, 0.4.13)."""
    for task_obj in loaded["tasks"].values():
        if task_obj.get_config("output_type") == "generate_until" and gen_kwargs:
            task_obj.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
        if num_fewshot is not None:
            if task_obj.get_config("num_fewshot") != 0:  # lm-eval never overrides a task that pins 0 shots
                task_obj.set_config(key="num_fewshot", value=num_fewshot)
        elif task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _docs_digest(task_obj: Any) -> str:
    h = hashlib.sha256()
    for doc in task_obj.eval_docs:
        h.update(json.dumps(doc, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _describe_task(task_obj: Any, request: str) -> dict[str, Any]:
    cfg = task_obj.config
    config = task_obj.dump_config()
    metadata = dict(config.get("metadata") or {})
    metadata.pop("config_source", None)  # where the YAML lies on this machine: not what the task is
    config["metadata"] = metadata
    filters = [str(f.get("name", "none")) for f in (cfg.filter_list or []) if isinstance(f, dict)] or ["none"]
    aggregations = {}
    for m in cfg.metric_list or []:
        if isinstance(m, dict) and "metric" in m:
            agg = m.get("aggregation", "mean")
            aggregations[str(m["metric"])] = agg if isinstance(agg, str) else getattr(agg, "__name__", "custom")
    dataset = "/".join(str(p) for p in (cfg.dataset_path, cfg.dataset_name) if p) or "custom"
    return {
        "request": request,
        "output_type": task_obj.OUTPUT_TYPE,
        "metrics": list(task_obj._metric_fn_list),
        "aggregations": aggregations,
        "filters": filters,
        "higher_is_better": {k: bool(v) for k, v in task_obj.higher_is_better().items()},
        "n_docs": len(task_obj.eval_docs),
        "docs_digest": _docs_digest(task_obj),
        "config_digest": _hash(config),
        "dataset": dataset,
        "num_fewshot": cfg.num_fewshot,
        "repeats": int(cfg.repeats or 1),
        "day0": {k[5:]: v for k, v in metadata.items() if k.startswith("day0_")},
        "alias": getattr(cfg, "task_alias", None),
    }


def _describe_group(group: Any, request: str) -> dict[str, Any]:
    aggregate = []
    for agg in group.aggregate_metric_list or []:
        how = agg.aggregation if isinstance(agg.aggregation, str) else "custom"
        aggregate.append({"metric": agg.metric, "filter_list": agg.filter_list, "aggregation": how,
                          "weight_by_size": bool(agg.weight_by_size)})
    return {"request": request, "children": list(group.child_names),
            "leaves": [t.task_name for t in group.get_all_tasks()], "aggregate": aggregate,
            "alias": getattr(group, "alias", None)}


def plan(caches: Caches, request: dict[str, Any]) -> dict[str, Any]:
    """Resolve the requested names (groups expand, tags expand), load every dataset, describe every task.

    lm-eval's own task index (~15k YAML files, 25 s measured on a busy 2-core machine) is built only when it is
    needed: when every name is among the included folders (pytest-day0's tasks and the user's), they are resolved
    from those alone first; a name they lack, or a group of theirs naming one of lm-eval's tasks (lm-eval then
    builds an inline ``group::task`` that fails), falls back to the full index, which is the answer either way."""
    _guard_downloads()
    include = [str(request["ours"]), *(str(p) for p in request["user_include"])]
    names = [(str(r["name"]), r.get("num_fewshot")) for r in request["requests"]]
    local = caches.manager(include, False)
    if not request.get("full_index") and all(name in local.all_tasks or Path(name).is_file() for name, _ in names):
        try:
            return _plan_with(local, names, defaults=False)
        except JobError as exc:
            if not exc.needs_index:
                raise
            log.info("day0: %s; resolving again with lm-eval's own task index", exc.message)
    return _plan_with(caches.manager(include, True), names, defaults=True)


def _plan_with(manager: Any, names: list[tuple[str, int | None]], *, defaults: bool) -> dict[str, Any]:
    import lm_eval

    out: dict[str, Any] = {"lm_eval_version": getattr(lm_eval, "__version__", None), "defaults": defaults,
                           "requests": [], "tasks": {}, "groups": {}}
    owner: dict[str, str] = {}
    for name, shots in names:
        text = name if shots is None else f"{name}@{shots}"
        loaded = _load(manager, name, shots)
        _apply_settings(loaded, shots, None)
        leaves = list(loaded["tasks"])
        for leaf in leaves:
            if leaf in owner:
                raise JobError("USER_CONFIG_ERROR", f"lm-eval task {leaf} is asked twice ({owner[leaf]} and {text})")
            owner[leaf] = text
            out["tasks"][leaf] = _describe_task(loaded["tasks"][leaf], text)
        for gname, group in loaded["groups"].items():
            out["groups"][gname] = _describe_group(group, text)
        out["requests"].append({"text": text, "name": name, "num_fewshot": shots, "leaves": leaves,
                                "groups": list(loaded["groups"])})
    return out


# ---------------------------------------------------------------------- models


def tokenizer_facts(tok: Any) -> dict[str, Any]:
    """How the served model tokenizes a text prompt, which lm-eval must reproduce when it sends token ids.

    OpenAI-compatible servers (vLLM, the reference server) encode a text prompt with the tokenizer's special
    tokens (``add_special_tokens=True``): whatever its post-processor prepends, not what ``add_bos_token`` in
    tokenizer_config.json declares. lm-eval's ``add_bos_token`` is exactly "encode with special tokens", so it is
    right when the special tokens are one leading BOS; anything else cannot be mirrored and is refused."""
    probe = "Question: 2+2=4"
    plain = list(tok(probe, add_special_tokens=False).input_ids)
    special = list(tok(probe, add_special_tokens=True).input_ids)
    if special == plain:
        add_bos: bool | None = False
    elif special == [tok.bos_token_id, *plain]:
        add_bos = True
    else:
        add_bos = None
    limit = getattr(tok, "model_max_length", None)
    max_length = int(limit) if isinstance(limit, int) and 0 < limit < 10_000_000 else None
    return {"add_bos_token": add_bos, "model_max_length": max_length, "special": special[:4], "plain": plain[:4]}


def _template_writes_bos(tok: Any) -> bool:
    """Does the chat template write the BOS token itself? Then a server encodes the rendered text without adding
    special tokens (vLLM, the reference server), and lm-eval must not add a second BOS."""
    if not getattr(tok, "chat_template", None) or not tok.bos_token:
        return False
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    except Exception:
        return False
    return isinstance(text, str) and text.startswith(tok.bos_token)


def _max_position(path: str) -> int | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def model_args(caches: Caches, job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval's model arguments for one side: ours, then the user's (which win). Returns (args, facts)."""
    user = dict(job.get("user_model_args") or {})
    base = str(job["url"]).rstrip("/")
    if job["chat"]:
        ours: dict[str, Any] = {"model": job["served_model"], "base_url": f"{base}/v1/chat/completions",
                                "num_concurrent": job["concurrency"], "max_retries": 3, "timeout": 600}
        return {**ours, **user}, {}
    tok_path = str(user.get("tokenizer", job["tokenizer"]))
    tok = caches.tokenizer(tok_path)
    facts = tokenizer_facts(tok)
    if job.get("apply_chat_template") and facts["add_bos_token"] and _template_writes_bos(tok):
        facts["add_bos_token"] = False  # the rendered chat text starts with BOS already, as the server sends it
    if facts["add_bos_token"] is None and "add_bos_token" not in user:
        raise JobError("EVAL_JUDGE_FAILED", f"the tokenizer at {tok_path} adds special tokens other than one leading "
                       f"BOS ({facts['special']} vs {facts['plain']}); lm-eval's token-id requests cannot mirror what "
                       "the server does with a text prompt: set --day0-lm-eval-args '--model_args add_bos_token=...'")
    max_length = facts["model_max_length"] or _max_position(tok_path) or 2048
    ours = {"model": job["served_model"], "base_url": f"{base}/v1/completions", "tokenizer": tok_path,
            "tokenizer_backend": "huggingface", "tokenized_requests": True,
            "add_bos_token": bool(facts["add_bos_token"]), "max_length": max_length,
            "num_concurrent": job["concurrency"], "max_retries": 3, "timeout": 600}
    return {**ours, **user}, facts


# ---------------------------------------------------------------------- one job


def _classify_run(exc: BaseException, task: str, url: str) -> JobError:
    names: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(names) < 6:
        names.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    status = getattr(exc, "status", None)
    transient = {"ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ClientOSError",
                 "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "TimeoutError",
                 "ServerTimeoutError", "ConnectTimeout", "ReadTimeout", "MemoryError"}
    if isinstance(status, int):
        if status >= 500 or status == 429:
            return JobError("INFRA_TRANSIENT", f"the endpoint {url} answered HTTP {status} to lm-eval ({task}): "
                            f"{_one_line(exc)}")
        return JobError("EVAL_JUDGE_FAILED", f"the endpoint {url} refused lm-eval's request for {task} with HTTP "
                        f"{status}: {_one_line(exc)}")
    if any(name in transient for name in names):
        return JobError("INFRA_TRANSIENT", f"the endpoint {url} did not answer lm-eval ({task}): {_one_line(exc)}")
    return JobError("EVAL_JUDGE_FAILED", f"lm-eval could not score {task}: {_one_line(exc)}")


def _completion_tokens(tok: Any, line: dict[str, Any]) -> int | None:
    resps = line.get("resps")
    if tok is None or not isinstance(resps, list) or not resps or not isinstance(resps[0], list) or not resps[0]:
        return None
    texts = [r for r in resps[0] if isinstance(r, str)]
    if not texts:
        return None
    counts = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
    return round(sum(counts) / len(counts))


def _write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, default=handle_non_serializable, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run_job(caches: Caches, job: dict[str, Any]) -> dict[str, Any]:
    """One (side, task): lm-eval against the side's endpoint with --log_samples; samples written to the job's path."""
    from lm_eval import evaluator
    from lm_eval.api.model import CachingLM

    _guard_downloads()
    leaf, request = str(job["leaf"]), str(job["request_name"])
    manager = caches.manager(job["include"], bool(job["defaults"]))
    settings = {"num_fewshot": job.get("num_fewshot"), "gen_kwargs": job.get("gen_kwargs")}
    load_key = json.dumps([job["include"], job["defaults"], request, settings], sort_keys=True, default=str)
    if load_key not in caches.loaded:
        loaded = _load(manager, request, job.get("num_fewshot"))
        _apply_settings(loaded, job.get("num_fewshot"), job.get("gen_kwargs"))
        caches.loaded[load_key] = loaded
    task_obj = caches.loaded[load_key]["tasks"].get(leaf)
    if task_obj is None:
        raise JobError("USER_CONFIG_ERROR", f"lm-eval name {request!r} no longer selects task {leaf}")
    args, facts = model_args(caches, job)
    kind = "local-chat-completions" if job["chat"] else "local-completions"
    try:
        lm = caches.lm(kind, args)
    except JobError:
        raise
    except Exception as exc:
        raise JobError("USER_CONFIG_ERROR", f"lm-eval {kind} with {sorted(args)}: {_one_line(exc)}") from exc
    random.seed(0)  # lm-eval's default seeds, every job: both sides draw the same few-shot examples
    try:
        import numpy as np

        np.random.seed(1234)
    except ImportError:
        pass
    task_obj.set_fewshot_seed(seed=int(job.get("fewshot_seed", 1234)))
    wrapped = CachingLM(lm, str(job["cache_path"]))
    docs = job.get("docs")  # None: every document; else the sorted document ids (lm-eval's --samples)
    n_docs = int(job["n_docs"])
    limit = samples = None
    if docs is not None:
        docs = sorted(int(d) for d in docs)
        if docs == list(range(len(docs))):
            limit = len(docs) if len(docs) < n_docs else None
        else:
            samples = {leaf: docs}
    started = time.time()
    try:
        results = evaluator.evaluate(
            lm=wrapped, task_dict={"tasks": {leaf: task_obj}, "groups": {}, "group_map": {}}, limit=limit,
            samples=samples, log_samples=True, bootstrap_iters=0,
            system_instruction=job.get("system_instruction"),
            apply_chat_template=job.get("apply_chat_template") or False,
            fewshot_as_multiturn=bool(job.get("fewshot_as_multiturn")),
            confirm_run_unsafe_code=bool(job.get("confirm_run_unsafe_code")))
    except JobError:
        raise
    except DatasetUnavailable as exc:
        raise _dataset_error(exc) from exc
    except Exception as exc:
        raise _classify_run(exc, leaf, str(job["url"])) from exc
    finally:
        wrapped.dbdict.close()
    lines = list((results or {}).get("samples", {}).get(leaf, []))
    counter = None
    if task_obj.OUTPUT_TYPE == "generate_until":
        counter = caches.tokenizer(str(job["tokenizer"])) if job.get("tokenizer") else None
    for line in lines:
        line["day0_completion_tokens"] = _completion_tokens(counter, line) if counter is not None else None
    _write_lines(Path(job["samples_path"]), lines)
    metrics = {k: v for k, v in (results or {}).get("results", {}).get(leaf, {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"ok": True, "lines": len(lines), "metrics": metrics, "seconds": round(time.time() - started, 3),
            "model": kind, "add_bos_token": args.get("add_bos_token"), "max_length": args.get("max_length"),
            "facts": facts}


# ---------------------------------------------------------------------- the process


def _reply(out: Any, data: dict[str, Any]) -> None:
    out.write(PROTO + json.dumps(data, default=str) + "\n")
    out.flush()


def _guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except JobError as exc:
        return {"ok": False, "failure_class": exc.failure_class, "message": exc.message}
    except DatasetUnavailable as exc:
        err = _dataset_error(exc)
        return {"ok": False, "failure_class": err.failure_class, "message": err.message}
    except Exception as exc:  # a bug here or in lm-eval: the traceback stays in the log for a human
        import traceback

        traceback.print_exc()
        return {"ok": False, "failure_class": "EVAL_JUDGE_FAILED", "message": f"lm-eval worker: {_one_line(exc)}"}


def _orphan_watch() -> None:
    """Exit when the parent is gone (SIGKILLed): a worker must never outlive the session that started it."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="day0-orphan-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # lm-eval and its libraries print; none of it may reach the protocol stream
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _orphan_watch()
    caches = Caches()
    if args[:1] == ["plan"]:
        request = json.loads(sys.stdin.read())
        _reply(out, _guarded(lambda: {"ok": True, **plan(caches, request)}))
        return 0
    if args[:1] == ["serve"]:
        try:  # the import is most of a worker's start: pay it before the first job, and say so if it fails
            import lm_eval.evaluator
            import lm_eval.models  # noqa: F401
        except ImportError as exc:
            _reply(out, {"ok": False, "failure_class": "USER_CONFIG_ERROR",
                         "message": f"lm-eval cannot be imported by {sys.executable}: {_one_line(exc)} (pip install "
                                    "'pytest-day0[lm-eval]')"})
            return 2
        _reply(out, {"ok": True, "ready": True, "pid": os.getpid()})
        for raw in sys.stdin:
            if raw.strip():
                job = json.loads(raw)
                _reply(out, _guarded(lambda job=job: run_job(caches, job)))  # type: ignore[misc]
        return 0
    print("usage: python -m pytest_day0.stages.lm_eval_worker {plan|serve}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
