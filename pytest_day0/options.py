"""The option table: one row gives the pytest flag, the ini key, the environment variable and the help text.

Its own module, with no dependency beyond the standard library, so the pytest plugin can register its options in
every session of an environment where pytest-day0 is installed without importing pydantic or anything else: a
session that does not use the plugin pays for this table only. ``config.py`` validates the values into a RunConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

DEMO_MODEL_ID = "demo"
DEMO_TASKS = ("arc_like", "gsm_like", "tau_like")


@dataclass(frozen=True)
class Option:
    name: str  # RunConfig field
    flag: str  # CLI flag
    help: str
    kind: Literal["str", "int", "float", "bool", "choice"] = "str"
    choices: tuple[str, ...] = ()
    default: Any = None
    secret: bool = False

    @property
    def ini(self) -> str:
        return "day0_" + self.name

    @property
    def env(self) -> str:
        return "DAY0_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("model", "--day0-model", "model to release: 'demo' (embedded), a local checkpoint path or a cached HF id"),
    Option("recipe", "--recipe", "quantization recipe(s), comma separated, as hf_ptq.py names them (fp8, nvfp4, "
           "int4_awq, ...)", default="fp8"),
    Option("tasks", "--day0-tasks", "comma separated built-in task names or task spec files (default: the demo tasks); "
           "with --day0-eval lm-eval, lm-eval task, group or tag names (groups expand to their subtasks)"),
    Option("suite", "--day0-suite", "a named task list for the lm-eval engine: smoke, standard, or one defined with "
           "--day0-suites (implies --day0-eval lm-eval)"),
    Option("suites", "--day0-suites", "YAML file (or, in ini, YAML text) defining suites: name: [task, ...] or name: "
           "{tasks: [...], description: ...}; a task may be {task: NAME, num_fewshot: N}"),
    Option("limit", "--day0-limit", "evaluate only the first N samples of each task", kind="int"),
    Option("threshold", "--day0-threshold", "quality tier: largest allowed drop as a fraction of the task's range "
           "(0.01 = 1 point on 0-100)", kind="float", default=0.01),
    Option("floor", "--day0-floor", "catastrophic floor: drop (fraction of range) that fails CI", kind="float",
           default=0.10),
    Option("relative", "--day0-relative", "measure drops relative to the baseline score instead of the task's range",
           kind="bool", default=False),
    Option("gate_mode", "--day0-gate-mode", "warn: quality breaches are reported; hard: they fail the run",
           kind="choice", choices=("warn", "hard"), default="warn"),
    Option("stat", "--day0-stat", "paired: decide on a paired per-sample confidence interval (PASS / REGRESSION / "
           "INCONCLUSIVE); point: the plain point-estimate rule of the ModelOpt skill", kind="choice",
           choices=("paired", "point"), default="paired"),
    Option("confidence", "--day0-confidence", "one-sided confidence of each verdict (the interval shown is two-sided "
           "2c-1: 0.95 gives a 90 percent interval)", kind="float", default=0.95),
    Option("verbosity", "--day0-verbosity", "largest |change| of mean completion tokens, as a fraction of the "
           "baseline's (VERBOSITY_EXCEEDED)", kind="float", default=0.05),
    # the divergence pre-check (gates/divergence.py): both sides' next-token distributions on a few texts, before
    # the long evaluation; defaults measured in bench/RESULTS.md ("Divergence pre-check")
    Option("divergence_texts", "--day0-divergence-texts", "texts of the divergence pre-check (the tasks' samples, "
           "prompt + answer, a fixed seeded choice); 0 turns the pre-check off", kind="int", default=32),
    Option("divergence_top_k", "--day0-divergence-top-k", "top logprobs per position the pre-check asks both "
           "endpoints for (vLLM's default --max-logprobs is 20)", kind="int", default=20),
    Option("divergence_floor", "--day0-divergence-floor", "pre-check, hard: top-1 agreement with the baseline below "
           "this is CATASTROPHIC_REGRESSION and the candidate's evaluation is skipped (0 never blocks)", kind="float",
           default=0.5),
    Option("divergence_kl", "--day0-divergence-kl", "pre-check, warn: mean token KL (nats) above this is REGRESSION",
           kind="float", default=0.25),
    Option("published", "--day0-published", "JSON/YAML file: task -> {score, scale} published for the baseline "
           "(EXTERNAL_BASELINE_MISMATCH beyond 5 percent of the range)"),
    Option("workdir", "--day0-workdir", "workspace for checkpoints, records and reports (default .day0 in rootdir)"),
    Option("quantize", "--day0-quantize", "quantize engine: modelopt, llmcompressor, existing, one a plugin registers "
           "(pytest_day0.engines), or none (no checkpoint, the PTQ gates skip)", default="modelopt"),
    Option("checkpoint", "--day0-checkpoint", "an already quantized checkpoint (with --day0-quantize existing)"),
    Option("eval", "--day0-eval", "where scores come from: scorer (serve and score here), lm-eval (serve here and "
           "run lm-eval-harness against each side; with --day0-lm-eval-baseline/-candidate: read two finished "
           "lm-eval output folders instead) or an eval engine a plugin registers", default="scorer"),
    Option("lm_eval_include", "--day0-lm-eval-include", "comma separated folders of your own lm-eval task YAMLs "
           "(lm-eval's --include_path)"),
    Option("lm_eval_args", "--day0-lm-eval-args", "lm-eval settings for both sides, lm-eval CLI syntax: "
           "'--num_fewshot 5 --apply_chat_template --gen_kwargs max_gen_toks=512 --model_args max_length=8192' "
           "(also --system_instruction, --fewshot_as_multiturn, --seed N, --confirm_run_unsafe_code)"),
    Option("lm_eval_python", "--day0-lm-eval-python", "python that runs lm-eval (default: this interpreter; install "
           "with pip install 'pytest-day0[lm-eval]')"),
    Option("lm_eval_baseline", "--day0-lm-eval-baseline", "lm-eval --output_path folder of the baseline (run with "
           "--log_samples), or a NeMo Evaluator nel eval run -o folder; implies --day0-eval lm-eval"),
    Option("lm_eval_candidate", "--day0-lm-eval-candidate", "lm-eval --output_path (or nel eval run -o) folder of "
           "the candidate"),
    Option("serve", "--day0-serve", "serve engine: reference, vllm, external, or one a plugin registers",
           default="reference"),
    Option("vllm_python", "--day0-vllm-python", "python of the environment with vLLM and llm-compressor (default: "
           ".venv-engines/bin/python next to the project, made by scripts/install-engines.sh)"),
    Option("vllm_args", "--day0-vllm-args", "extra vLLM server arguments, shell syntax (e.g. '--tensor-parallel-size 2 "
           "--dtype float32'); they override ours"),
    Option("baseline_url", "--day0-baseline-url", "OpenAI-compatible URL serving the baseline (--day0-serve external)"),
    Option("candidate_url", "--day0-candidate-url", "URL serving the candidate (--day0-serve external)"),
    Option("baseline_model", "--day0-baseline-model", "model name to ask the baseline URL for (required when its "
           "/v1/models lists several)"),
    Option("candidate_model", "--day0-candidate-model", "model name to ask the candidate URL for (required when its "
           "/v1/models lists several)"),
    Option("api_key", "--day0-api-key", "API key for external endpoints (prefer the DAY0_API_KEY environment variable)",
           secret=True),
    Option("concurrency", "--day0-concurrency", "requests in flight per evaluation", kind="int", default=16),
    Option("adaptive", "--day0-adaptive", "evaluate both sides in lockstep rounds over a seeded order of each task's "
           "items and stop a task as soon as an anytime-valid confidence sequence decides it (PASS, REGRESSION, "
           "the floor) or shows it cannot be decided", kind="bool", default=False),
    Option("mlflow", "--day0-mlflow", "log the session to MLflow: a run per recipe nested under the session's run "
           "(params, per-task metrics, verdict tags, artifacts) at MLFLOW_TRACKING_URI, else MLflow's default local "
           "store; needs pytest-day0[mlflow]", kind="bool", default=False),
    Option("mlflow_experiment", "--day0-mlflow-experiment", "MLflow experiment the runs go into",
           default="pytest-day0"),
    Option("fresh", "--day0-fresh", "ignore cached artifacts and run every stage again", kind="bool", default=False),
    Option("stage_timeout", "--day0-stage-timeout", "seconds any one stage may take", kind="float", default=3600.0),
    Option("calib_size", "--day0-calib-size", "calibration samples for PTQ", kind="int", default=64),
    # where PTQ and serving run (pytest_day0/remote): this machine, an SSH host, or a SLURM cluster over SSH
    Option("executor", "--day0-executor", "where PTQ and serving run: local, ssh://user@host[:port] or "
           "slurm://user@host[:port]?partition=P&time=HH:MM:SS (query = sbatch options)", default="local"),
    Option("ssh_key", "--day0-ssh-key", "private key for ssh:// and slurm:// (default: ssh-agent, ~/.ssh keys)"),
    Option("ssh_key_passphrase", "--day0-ssh-key-passphrase", "the key's passphrase (prefer the "
           "DAY0_SSH_KEY_PASSPHRASE environment variable)", secret=True),
    Option("known_hosts", "--day0-known-hosts", "known_hosts file the host key is verified against "
           "(default ~/.ssh/known_hosts)"),
    Option("trust_new_host", "--day0-trust-new-host", "accept and record the key of a host not in known_hosts "
           "(a changed key is always refused)", kind="bool", default=False),
    Option("sbatch_args", "--day0-sbatch-args", "extra sbatch options, shell syntax (e.g. '--gres=gpu:1 "
           "--account=proj')"),
    Option("remote_workdir", "--day0-remote-workdir", "workspace on the remote host (default ~/.day0-remote)"),
    Option("remote_python", "--day0-remote-python", "python with pytest-day0 on the remote host (default: this "
           "interpreter's path)"),
    Option("remote_model", "--day0-remote-model", "the source checkpoint's path on the remote host (default: "
           "uploaded over SFTP once)"),
    Option("ptq_command", "--day0-ptq-command", "remote PTQ command template, e.g. 'python hf_ptq.py "
           "--pyt_ckpt_path {model} --qformat {qformat} --export_path {export_path}' (default: pytest-day0's)"),
    Option("serve_command", "--day0-serve-command", "remote serve command template, e.g. 'vllm serve {checkpoint} "
           "--served-model-name {name} --host 0.0.0.0 --port {port}' (default: the reference server)"),
)
