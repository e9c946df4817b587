"""The SLURM executor: the cluster's own scheduler, driven over the SSH executor.

Submission is ``sbatch --parsable`` (a rejection is the user's configuration: partition, account, time limit);
state comes from ``squeue`` while a job is queued or running, then ``scontrol show job`` (kept for MinJobAge
seconds), then ``sacct -c`` (the job-completion log, no slurmdbd needed) and plain ``sacct``. ``scancel``
stops jobs; every job name starts with ``day0-<session>-`` so a session can also find jobs whose id it never
got (interrupted while sbatch was answering).
"""

from __future__ import annotations

from collections.abc import Sequence

from pytest_day0.failures import Day0Error, FailureClass
from pytest_day0.remote.executor import JobHandle, JobSpec, JobStatus
from pytest_day0.remote.ssh import SSHExecutor, SSHTarget


def normalize_state(raw: str) -> str:
    """``CANCELLED by 1000``, ``COMPLETED+``, ``failed`` -> SLURM's bare upper-case state name."""
    word = raw.strip().split(" ")[0] if raw.strip() else "UNKNOWN"
    return word.rstrip("+").upper()


def parse_exit_code(raw: str | None) -> int | None:
    """SLURM's ``ExitCode=rc:signal``; a signal shows as 128+signal, like a shell would."""
    if not raw:
        return None
    rc, _, sig = raw.strip().partition(":")
    if not rc.isdigit():
        return None
    return 128 + int(sig) if sig.isdigit() and int(sig) and not int(rc) else int(rc)


def parse_scontrol(text: str) -> JobStatus | None:
    """``scontrol show job -o`` output (``Key=Value`` fields on one line) -> status, None if no job."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    if "JobState" not in fields:
        return None
    node = fields.get("BatchHost") or fields.get("NodeList")
    return JobStatus(normalize_state(fields["JobState"]), parse_exit_code(fields.get("ExitCode")),
                     None if node in (None, "(null)") else node, fields.get("Reason", ""))


def parse_sacct(text: str, job_id: str) -> JobStatus | None:
    """``sacct --parsable2 --noheader --format=JobID,State,ExitCode,NodeList``: the job's own row."""
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[0] == job_id:
            node = parts[3] if len(parts) > 3 and parts[3] not in ("", "None assigned") else None
            return JobStatus(normalize_state(parts[1]), parse_exit_code(parts[2]), node)
    return None


def parse_sbatch(output: str) -> str | None:
    """``sbatch --parsable`` prints ``jobid`` or ``jobid;cluster`` as its last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    if not lines:
        return None
    job_id = lines[-1].split(";")[0]
    return job_id if job_id.isdigit() else None


class SlurmExecutor(SSHExecutor):
    """Commands, files and tunnels as the SSH executor; jobs through the cluster's scheduler."""

    kind = "slurm"

    def __init__(self, target: SSHTarget, sbatch_args: Sequence[str] = ()) -> None:
        super().__init__(target)
        self.sbatch_args = tuple(sbatch_args)

    def describe(self) -> str:
        return f"slurm://{self.target.label}"

    def sbatch_argv(self, job: JobSpec) -> list[str]:
        # sbatch expands %j, %x, ... in --output itself: a literal % in the user's workspace path is written %%
        return ["sbatch", "--parsable", f"--job-name={job.name}", f"--output={job.log_path.replace('%', '%%')}",
                f"--chdir={job.workdir}", *self.sbatch_args, job.script_path]

    def submit(self, job: JobSpec) -> JobHandle:
        self.write_bytes(job.script_path, job.script.encode())
        result = self.run(self.sbatch_argv(job), timeout_s=120)
        job_id = parse_sbatch(result.output) if result.ok else None
        if job_id is None:
            # The scheduler refused the request as written (partition, account, time, gres): the user's to fix.
            raise Day0Error(FailureClass.USER_CONFIG_ERROR,
                            f"sbatch rejected job {job.name} (exit {result.exit_status}): {result.last_line()}")
        return JobHandle(job_id, job.name, job.log_path, self.kind)

    def status(self, job: JobHandle) -> JobStatus:
        jid = job.job_id
        queued = self.run(["squeue", "-h", "-j", jid, "-o", "%T|%N|%r"], timeout_s=60)
        for line in queued.output.splitlines() if queued.ok else []:
            state, _, rest = line.strip().partition("|")
            node, _, reason = rest.partition("|")
            if state:
                return JobStatus(normalize_state(state), None, node or None, reason)
        shown = self.run(["scontrol", "show", "job", "-o", jid], timeout_s=60)
        status = parse_scontrol(shown.output) if shown.ok else None
        if status is not None:
            return status
        for argv in (["sacct", "-c", "-j", jid], ["sacct", "-j", jid]):
            acct = self.run([*argv, "--noheader", "--parsable2", "--format=JobID,State,ExitCode,NodeList"],
                            timeout_s=60)
            status = parse_sacct(acct.output, jid) if acct.ok else None
            if status is not None:
                return status
        return JobStatus("UNKNOWN", None, None, "the scheduler has no record of the job")

    def cancel(self, jobs: Sequence[JobHandle]) -> None:
        ids = [j.job_id for j in jobs if j.job_id.isdigit()]
        if ids:
            self.run(["scancel", *ids], timeout_s=120)

    def jobs_named(self, prefix: str) -> list[JobHandle]:
        """This user's queued or running jobs whose name starts with ``prefix``."""
        listed = self.run(["squeue", "-h", "--me", "-o", "%i|%j"], timeout_s=60)
        found = []
        for line in listed.output.splitlines() if listed.ok else []:
            job_id, _, name = line.strip().partition("|")
            if job_id.isdigit() and name.startswith(prefix):
                found.append(JobHandle(job_id, name, "", self.kind))
        return found
