"""The SLURM executor: the state table (pure) and real jobs on the loopback cluster (sbatch over SSH).

SLURM states map onto failure classes as the issue defines them; a job's log streams while it runs; a
failed job is its stage's class with the log tail in one line; sbatch's refusal is the user's configuration;
a stage timeout or Ctrl-C cancels the job (``squeue`` checked directly, as root, around the code under test);
a path with ``;`` and spaces passes through a job script as one argument.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster.loopback import LoopbackCluster, cluster_or_skip

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.remote import render_template
from pytest_day0.remote.executor import JobHandle, JobSpec, JobStatus, job_script
from pytest_day0.remote.jobs import decide_job, watch_job
from pytest_day0.remote.slurm import (
    SlurmExecutor,
    normalize_state,
    parse_exit_code,
    parse_sacct,
    parse_sbatch,
    parse_scontrol,
)

TAIL = ["loading", "Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA out of memory"]


# ---------------------------------------------------------------------- pure: the state table


@pytest.mark.parametrize(("state", "expected"), [
    ("PENDING", "wait"), ("RUNNING", "wait"), ("CONFIGURING", "wait"), ("COMPLETING", "wait"),
    ("COMPLETED", "ok"),
    ("FAILED", FailureClass.CHECKPOINT_NOT_SERVABLE), ("OUT_OF_MEMORY", FailureClass.CHECKPOINT_NOT_SERVABLE),
    ("TIMEOUT", FailureClass.INFRA_TRANSIENT), ("PREEMPTED", FailureClass.INFRA_TRANSIENT),
    ("NODE_FAIL", FailureClass.INFRA_TRANSIENT), ("BOOT_FAIL", FailureClass.INFRA_TRANSIENT),
])
def test_slurm_state_to_decision(state: str, expected: object) -> None:
    decision = decide_job(JobStatus(state, 1 if state != "COMPLETED" else 0), FailureClass.CHECKPOINT_NOT_SERVABLE,
                          "PTQ fp8", "42", TAIL)
    if expected in ("wait", "ok"):
        assert decision == expected
        return
    assert isinstance(decision, Day0Error) and decision.failure_class is expected
    assert "\n" not in str(decision) and "job 42" in str(decision) and state in str(decision)
    assert "CUDA out of memory" in str(decision)  # the log tail travels with the failure


def test_a_service_that_completes_before_it_is_ready_is_a_failure() -> None:
    decision = decide_job(JobStatus("COMPLETED", 0), FailureClass.DEPLOYMENT_HEALTH_FAILED, "serve fp8", "7", ["bye"],
                          service=True)
    assert isinstance(decision, Day0Error) and decision.failure_class is FailureClass.DEPLOYMENT_HEALTH_FAILED
    assert "ended before it was ready" in str(decision)


def test_scheduler_output_parsers() -> None:
    assert normalize_state("CANCELLED by 1000") == "CANCELLED" and normalize_state("completed+") == "COMPLETED"
    assert parse_exit_code("3:0") == 3 and parse_exit_code("0:9") == 137 and parse_exit_code(None) is None
    assert parse_sbatch("17\n") == "17" and parse_sbatch("18;cluster\n") == "18" and parse_sbatch("error") is None
    shown = parse_scontrol("JobId=5 JobName=x JobState=OUT_OF_MEMORY Reason=OutOfMemory ExitCode=0:125 "
                           "NodeList=node7 BatchHost=node7")
    assert shown == JobStatus("OUT_OF_MEMORY", 253, "node7", "OutOfMemory")
    assert parse_scontrol("slurm_load_jobs error: Invalid job id specified") is None
    assert parse_sacct("5|TIMEOUT|0:15|node3\n5.batch|CANCELLED|0:15|node3\n", "5") == JobStatus("TIMEOUT", 143,
                                                                                                "node3")


def test_executor_url_and_options_are_validated_once_as_one_line() -> None:
    from pytest_day0.config import build_config
    from pytest_day0.remote import parse_executor

    spec = parse_executor("slurm://me@login.example.org:2200?partition=gpu&time=02:00:00&exclusive")
    assert (spec.kind, spec.user, spec.host, spec.port) == ("slurm", "me", "login.example.org", 2200)
    assert spec.sbatch_args == ("--partition=gpu", "--time=02:00:00", "--exclusive")
    assert parse_executor("ssh://host").port == 22 and not parse_executor("local").remote

    def error(**cli: object) -> str:
        with pytest.raises(Day0Error) as info:
            build_config({"model": "demo", **cli}, lambda _k: None)
        assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR and "\n" not in str(info.value)
        return str(info.value)

    assert "no password" in error(executor="slurm://me:hunter2@login") and "hunter2" not in error(
        executor="ftp://me:hunter2@login")
    assert "sbatch options, for slurm://" in error(executor="ssh://login?partition=gpu")
    assert "{modle}" in error(executor="ssh://login", ptq_command="hf_ptq.py --pyt_ckpt_path {modle}")
    assert "remote executor" in error(serve_command="vllm serve {checkpoint} --port {port}")
    assert "--day0-executor" in error(executor="slurm://login?bad key=1")


# ---------------------------------------------------------------------- the real cluster


@pytest.fixture(scope="module")
def cluster() -> LoopbackCluster:
    return cluster_or_skip()


@pytest.fixture(scope="module")
def slurm(cluster: LoopbackCluster) -> Iterator[SlurmExecutor]:
    ex = SlurmExecutor(cluster.target(), ["--partition=debug", "--time=00:10:00"])  # type: ignore[arg-type]
    yield ex
    ex.close()


@pytest.fixture()
def wd(cluster: LoopbackCluster, slurm: SlurmExecutor) -> Iterator[str]:
    """A fresh remote workspace; the cluster's test lock is held so no sibling test sees these jobs queued."""
    path = cluster.workdir()
    with cluster.exclusive():
        slurm.makedirs(f"{path}/logs")
        yield path
        slurm.remove_tree(path)


def _job(wd: str, name: str, command: str) -> JobSpec:
    return JobSpec(f"day0-test-{name}", job_script(command), wd, f"{wd}/logs/{name}.log", f"{wd}/{name}.sh")


def _gone(cluster: LoopbackCluster, job: JobHandle, within_s: float = 15) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(line.startswith(f"{job.job_id}|") for line in cluster.queued_jobs()):
            return True
        time.sleep(0.25)
    return False


def test_job_log_streams_while_it_runs_and_completes(cluster: LoopbackCluster, slurm: SlurmExecutor,
                                                     wd: str) -> None:
    job = slurm.submit(_job(wd, "stream", "for i in 1 2 3 4; do echo step $i; sleep 0.7; done"))
    assert job.job_id.isdigit()
    seen: list[tuple[float, str]] = []  # (when it reached us, line)
    states: list[tuple[float, str]] = []
    status, tail = watch_job(slurm, job, what="stream", stage_class=FailureClass.UNKNOWN, timeout_s=90,
                             on_line=lambda line: seen.append((time.monotonic(), line)),
                             on_state=lambda s: states.append((time.monotonic(), s.state)))
    assert status.state == "COMPLETED" and status.exit_code in (0, None)
    assert [line for _, line in seen] == ["step 1", "step 2", "step 3", "step 4"] and tail[-1] == "step 4"
    assert states[-1][1] == "COMPLETED"
    # streamed: the first line reached us well before the job was seen to end (it runs ~2.8 s after it)
    assert seen[0][0] < states[-1][0] - 1.0, (seen, states)
    acct = slurm.run(["sacct", "-c", "-j", job.job_id, "--noheader", "--parsable2",
                      "--format=JobID,State,ExitCode,NodeList"])
    assert parse_sacct(acct.output, job.job_id) == JobStatus("COMPLETED", 0, "localhost")


def test_failed_job_is_the_stage_class_with_its_log_tail(slurm: SlurmExecutor, wd: str) -> None:
    job = slurm.submit(_job(wd, "oom", "echo loading weights; echo 'torch.OutOfMemoryError: out of memory' >&2; "
                                       "exit 1"))
    with pytest.raises(Day0Error) as info:
        watch_job(slurm, job, what="PTQ nvfp4", stage_class=FailureClass.MODEL_UNSUPPORTED, timeout_s=60)
    message = str(info.value)
    assert info.value.failure_class is FailureClass.MODEL_UNSUPPORTED and "\n" not in message
    assert f"job {job.job_id} FAILED, exit 1" in message and "torch.OutOfMemoryError: out of memory" in message


def test_rejected_sbatch_is_a_user_config_error(cluster: LoopbackCluster, wd: str) -> None:
    bad = SlurmExecutor(cluster.target(), ["--partition=no_such_partition"])  # type: ignore[arg-type]
    try:
        with pytest.raises(Day0Error) as info:
            bad.submit(_job(wd, "rejected", "true"))
    finally:
        bad.close()
    assert info.value.failure_class is FailureClass.USER_CONFIG_ERROR
    assert "sbatch rejected" in str(info.value) and "invalid partition" in str(info.value).lower()


def test_stage_timeout_cancels_the_job(cluster: LoopbackCluster, slurm: SlurmExecutor, wd: str) -> None:
    job = slurm.submit(_job(wd, "slow", "sleep 120"))
    with pytest.raises(Day0Error) as info:
        watch_job(slurm, job, what="serve fp8", stage_class=FailureClass.DEPLOYMENT_HEALTH_FAILED, timeout_s=3,
                  ready=lambda _s: False)
    assert info.value.failure_class is FailureClass.INFRA_TRANSIENT and "stage timeout" in str(info.value)
    assert _gone(cluster, job), cluster.queued_jobs()
    assert slurm.status(job).state == "CANCELLED"


def test_ctrl_c_while_waiting_cancels_the_job(cluster: LoopbackCluster, slurm: SlurmExecutor, wd: str) -> None:
    job = slurm.submit(_job(wd, "interrupted", "echo started; sleep 120"))

    def interrupt(_line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        watch_job(slurm, job, what="PTQ fp8", stage_class=FailureClass.UNKNOWN, timeout_s=60, on_line=interrupt)
    assert _gone(cluster, job), cluster.queued_jobs()


def test_cancel_by_session_prefix_finds_jobs_whose_id_we_never_got(cluster: LoopbackCluster,
                                                                   slurm: SlurmExecutor, wd: str) -> None:
    job = slurm.submit(_job(wd, "orphan-a", "sleep 120"))
    found = slurm.jobs_named("day0-test-orphan-")
    assert [j.job_id for j in found] == [job.job_id]
    slurm.cancel(found)
    assert _gone(cluster, job), cluster.queued_jobs()


def test_model_path_with_semicolon_and_spaces_reaches_the_job_as_one_argument(
        slurm: SlurmExecutor, wd: str, tmp_path: Path) -> None:
    model = f"{wd}/models/org model; touch {wd}/PWNED; echo"
    slurm.makedirs(model)
    slurm.write_bytes(f"{model}/config.json", b"{}")
    command = render_template("ls -- {model} && printf '%s\\n' {qformat}", {"model": model, "qformat": "fp8 $(id)"})
    job = slurm.submit(_job(wd, "quoting", command))
    status, tail = watch_job(slurm, job, what="quoting", stage_class=FailureClass.UNKNOWN, timeout_s=60)
    assert status.state == "COMPLETED"
    assert tail == ["config.json", "fp8 $(id)"]
    assert not slurm.exists(f"{wd}/PWNED")
    assert shlex.split(command)[2] == model  # the very string the user gave, as one word
