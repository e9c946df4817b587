"""What a user sets for the lm-eval engine, parsed and normalized once: task requests, suites, lm-eval's own flags.

Pure and light (standard library and PyYAML): ``config.py`` validates with it, so a bad value is one
USER_CONFIG_ERROR line at the start of the session, and a session that does not use lm-eval never imports lm-eval.

**One setting for both sides, by construction**: there is exactly one ``--day0-lm-eval-args``, parsed here into one
frozen ``LmEvalArgs``; the engine builds every side's job from it, and its normalized form is part of every
records key. No per-side option exists to differ.

**Task requests** are ``NAME`` or ``NAME@N`` (N-shot, overriding the task's default; lm-eval names never hold an
``@``). A suite is a named list of them.
"""

from __future__ import annotations

import argparse
import ast
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The built-in suites. "smoke" runs anywhere (pytest-day0's own local tasks, no download): it proves the serving
# and lm-eval plumbing, it says nothing about a real model's quality. "standard" mirrors what model cards report,
# with the few-shot counts they report them at (Open LLM Leaderboard v1 settings, plus MMLU-Pro, GPQA and IFEval).
BUILTIN_SUITES: dict[str, dict[str, Any]] = {
    "smoke": {
        "description": "pytest-day0's own lm-eval tasks (the demo's tasks and the MMLU-shaped demo_mmlu_like group): "
                       "local files, no download; a plumbing check, not a quality measurement",
        "tasks": ["arc_like", "gsm_like", "tau_like", "demo_mmlu_like"],
    },
    "standard": {
        "description": "what model cards report: MMLU 5-shot, MMLU-Pro 5-shot, ARC-Challenge 25-shot, HellaSwag "
                       "10-shot, Winogrande 5-shot, GSM8K 5-shot, GPQA (main, 5-shot), IFEval, TruthfulQA-MC2",
        "tasks": ["mmlu@5", "mmlu_pro", "arc_challenge@25", "hellaswag@10", "winogrande@5", "gsm8k@5",
                  "gpqa_main_n_shot", "ifeval", "truthfulqa_mc2"],
    },
}


class SettingsError(ValueError):
    """A bad lm-eval setting: ``config.py`` turns it into one USER_CONFIG_ERROR line."""


@dataclass(frozen=True)
class TaskRequest:
    name: str  # an lm-eval task, group or tag name, or a YAML path
    num_fewshot: int | None = None

    @property
    def text(self) -> str:
        return self.name if self.num_fewshot is None else f"{self.name}@{self.num_fewshot}"


def parse_task_request(text: str) -> TaskRequest:
    name, sep, shots = text.strip().partition("@")
    if not name or any(c.isspace() for c in name):
        raise SettingsError(f"--day0-tasks: {text!r} is not a task name")
    if not sep:
        return TaskRequest(name)
    if not shots.isdigit():
        raise SettingsError(f"--day0-tasks: {text!r}: after '@' comes the number of shots")
    return TaskRequest(name, int(shots))


# ---------------------------------------------------------------------- suites


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[str, ...]  # normalized task requests (NAME or NAME@N)
    description: str = ""


def _suite(name: str, raw: Any) -> Suite:
    if isinstance(raw, (list, tuple)):
        raw = {"tasks": list(raw)}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("tasks"), (list, tuple)) or not raw["tasks"]:
        raise SettingsError(f"suite {name!r}: expected a list of tasks or {{tasks: [...], description: ...}}")
    unknown = set(raw) - {"tasks", "description"}
    if unknown:
        raise SettingsError(f"suite {name!r}: unknown keys {', '.join(sorted(unknown))} (tasks, description)")
    tasks: list[str] = []
    for item in raw["tasks"]:
        if isinstance(item, Mapping):
            if set(item) - {"task", "num_fewshot"} or not isinstance(item.get("task"), str):
                raise SettingsError(f"suite {name!r}: a task entry is NAME or {{task: NAME, num_fewshot: N}}, "
                                    f"got {dict(item)!r}")
            shots = item.get("num_fewshot")
            if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
                raise SettingsError(f"suite {name!r}: num_fewshot of {item['task']} must be a count")
            tasks.append(TaskRequest(item["task"], shots).text)
        elif isinstance(item, str):
            tasks.append(parse_task_request(item).text)
        else:
            raise SettingsError(f"suite {name!r}: a task entry is NAME or {{task: NAME, num_fewshot: N}}")
    return Suite(name, tuple(tasks), str(raw.get("description", "")))


def load_suites(value: str | None, base: Path | None = None) -> dict[str, Suite]:
    """The built-in suites, then the user's (a YAML file, or YAML text from an ini file); a user's suite of the
    same name replaces the built-in one."""
    import yaml

    suites = {name: _suite(name, raw) for name, raw in BUILTIN_SUITES.items()}
    if not value:
        return suites
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    text = value
    if "\n" not in value and ":" not in value.split("/")[-1]:  # a file name, not inline YAML
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"--day0-suites {value}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"--day0-suites: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, Mapping):
        raise SettingsError("--day0-suites: expected a mapping of suite name -> tasks")
    for name, raw in data.items():
        suites[str(name)] = _suite(str(name), raw)
    return suites


def suite_tasks(name: str, suites: Mapping[str, Suite]) -> tuple[str, ...]:
    suite = suites.get(name)
    if suite is None:
        raise SettingsError(f"--day0-suite {name}: no such suite (known: {', '.join(sorted(suites))}; define your "
                            "own with --day0-suites FILE)")
    return suite.tasks


# ---------------------------------------------------------------------- lm-eval's own flags


def _literal(text: str) -> Any:
    """lm-eval's reading of a ``key=value`` value: a Python literal when it is one, else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        return {"true": True, "false": False}.get(lowered, text)


def parse_pairs(text: str, flag: str) -> tuple[tuple[str, Any], ...]:
    """``k=v,k2=v2`` (lm-eval's ``--gen_kwargs`` / ``--model_args`` syntax), sorted by key."""
    out: dict[str, Any] = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--day0-lm-eval-args {flag}: expected key=value pairs, got {part!r}")
        out[key.strip()] = _literal(value.strip())
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class LmEvalArgs:
    """The lm-eval settings both sides run with. ``None`` means lm-eval's (or the task's) own default."""

    num_fewshot: int | None = None
    gen_kwargs: tuple[tuple[str, Any], ...] = ()
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool | None = None  # lm-eval's CLI rule: on with a chat template unless said otherwise
    system_instruction: str | None = None
    fewshot_seed: int = 1234  # lm-eval's default fewshot seed
    model_args: tuple[tuple[str, Any], ...] = ()  # extra local-completions arguments; they override ours
    confirm_run_unsafe_code: bool = False
    raw: str = field(default="", compare=False)

    @property
    def multiturn(self) -> bool:
        return bool(self.apply_chat_template) if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn

    def normalized(self) -> dict[str, Any]:
        """What goes into records keys: every setting that changes a request or a score, nothing else."""
        return {"num_fewshot": self.num_fewshot, "gen_kwargs": [list(p) for p in self.gen_kwargs],
                "apply_chat_template": self.apply_chat_template, "fewshot_as_multiturn": self.multiturn,
                "system_instruction": self.system_instruction, "fewshot_seed": self.fewshot_seed,
                "model_args": [[k, repr(v)] for k, v in self.model_args],
                "confirm_run_unsafe_code": self.confirm_run_unsafe_code}


def _bool_text(text: str) -> bool:
    if text.lower() in {"true", "1", "yes"}:
        return True
    if text.lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="--day0-lm-eval-args", add_help=False, exit_on_error=False, allow_abbrev=False)
    p.add_argument("--num_fewshot", "-f", type=int)
    p.add_argument("--gen_kwargs")
    p.add_argument("--apply_chat_template", nargs="?", const=True, default=False)
    p.add_argument("--fewshot_as_multiturn", nargs="?", const=True, type=_bool_text)
    p.add_argument("--system_instruction")
    p.add_argument("--seed", type=int)
    p.add_argument("--model_args")
    p.add_argument("--confirm_run_unsafe_code", action="store_true")
    return p


# lm-eval flags with a pytest-day0 option of their own (or none that applies to one side's run): said by name.
_OWNED = {"--limit": "--day0-limit", "-L": "--day0-limit", "--tasks": "--day0-tasks", "-t": "--day0-tasks",
          "--include_path": "--day0-lm-eval-include", "--model": "--day0-serve/--day0-eval",
          "--output_path": "--day0-workdir", "-o": "--day0-workdir", "--log_samples": "(always on)",
          "--use_cache": "(always on, per side, in the workspace)", "--samples": "(the engine picks the documents)",
          "--batch_size": "(API models send one request per document)"}


def parse_lm_eval_args(text: str | None) -> LmEvalArgs:
    if not text or not text.strip():
        return LmEvalArgs()
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise SettingsError(f"--day0-lm-eval-args: {exc}") from None
    for word in words:
        flag = word.split("=", 1)[0]
        if flag in _OWNED:
            raise SettingsError(f"--day0-lm-eval-args: {flag} is set by pytest-day0: use {_OWNED[flag]}")
    try:
        ns, rest = _parser().parse_known_args(words)
    except (argparse.ArgumentError, argparse.ArgumentTypeError) as exc:
        raise SettingsError(f"--day0-lm-eval-args: {exc}") from None
    if rest:
        raise SettingsError(f"--day0-lm-eval-args: not an lm-eval setting pytest-day0 passes on: {' '.join(rest)} "
                            "(known: --num_fewshot, --gen_kwargs, --apply_chat_template, --fewshot_as_multiturn, "
                            "--system_instruction, --seed, --model_args, --confirm_run_unsafe_code)")
    if ns.num_fewshot is not None and ns.num_fewshot < 0:
        raise SettingsError("--day0-lm-eval-args: --num_fewshot must be a count")
    if ns.fewshot_as_multiturn and not ns.apply_chat_template:
        raise SettingsError("--day0-lm-eval-args: --fewshot_as_multiturn needs --apply_chat_template")
    return LmEvalArgs(
        num_fewshot=ns.num_fewshot,
        gen_kwargs=parse_pairs(ns.gen_kwargs, "--gen_kwargs") if ns.gen_kwargs else (),
        apply_chat_template=ns.apply_chat_template,
        fewshot_as_multiturn=ns.fewshot_as_multiturn,
        system_instruction=ns.system_instruction,
        fewshot_seed=1234 if ns.seed is None else ns.seed,
        model_args=parse_pairs(ns.model_args, "--model_args") if ns.model_args else (),
        confirm_run_unsafe_code=bool(ns.confirm_run_unsafe_code),
        raw=text,
    )
