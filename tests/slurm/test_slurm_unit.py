"""synthunlearn.slurm (node lists, rendezvous, CLI) and the batch scripts' stop/requeue protocol
with stand-in srun/scontrol commands: no cluster needed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from synthunlearn.slurm import (PORT_BASE, PORT_SPAN, HostlistError, expand_hostlist, hostnames, master_port,
                                output_dir, rendezvous)
from tests.launcher import REPO

SCRIPTS = {job: REPO / "launch" / "slurm" / f"{job}.sbatch" for job in ("sft", "unlearn")}


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("n[1-3]-ib,login", ["n1-ib", "n2-ib", "n3-ib", "login"]),
    ("node7", ["node7"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("a[08-11]", ["a08", "a09", "a10", "a11"]),
    ("a[098-101]", ["a098", "a099", "a100", "a101"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("x[1,3],y,z[5-6]-ib", ["x1", "x3", "y", "z5-ib", "z6-ib"]),
    ("host-1.example.org,host-2.example.org", ["host-1.example.org", "host-2.example.org"]),
    ("a[1-2] b", ["a1", "a2", "b"]),
    ("c[3]", ["c3"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["a[1-", "a]1[", "a[x-2]", "a[3-1]", "a[1,,2]", "a[[1]]", "a[]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(HostlistError):
        expand_hostlist(bad)


def test_hostnames_from_environment_without_scontrol():
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]"}
    assert hostnames(environ=env, use_scontrol=False) == ["gpu01", "gpu02"]
    with pytest.raises(HostlistError, match="SLURM_JOB_NODELIST"):
        hostnames(environ={}, use_scontrol=False)


def test_master_port_is_deterministic_and_in_range():
    assert master_port("123") == master_port(123) == PORT_BASE + 123
    ports = {master_port(j) for j in range(100000, 100000 + PORT_SPAN)}
    assert len(ports) == PORT_SPAN and min(ports) == PORT_BASE and max(ports) < 32768  # below ephemeral ports
    with pytest.raises(HostlistError):
        master_port("12_3")


def test_rendezvous_from_job_environment_and_overrides():
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242", "MASTER_ADDR": "stale", "MASTER_PORT": "1"}
    assert rendezvous(env, use_scontrol=False) == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(PORT_BASE + 4242)}
    env.update(SYNTHUNLEARN_MASTER_ADDR="gpu07-ib", SYNTHUNLEARN_MASTER_PORT="29500")
    assert rendezvous(env, use_scontrol=False) == {"MASTER_ADDR": "gpu07-ib", "MASTER_PORT": "29500"}


def test_output_dir_uses_the_launchers_parser():
    assert output_dir("unlearn", []) == "runs/unlearn"
    assert output_dir("sft", ["--max-steps", "3", "--output-dir", "x/y", "a.b=1"]) == "x/y"
    assert output_dir("sft", ["--output-dir=z", "--overwrite"]) == "z"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "synthunlearn.slurm", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=60)


def test_cli():
    p = _cli("hostnames", "gpu[01-02],login", "--no-scontrol")
    assert p.returncode == 0 and p.stdout.split() == ["gpu01", "gpu02", "login"]
    assert _cli("master-addr", "n[3-4]-ib", "--no-scontrol").stdout.strip() == "n3-ib"
    assert _cli("master-port", "7").stdout.strip() == str(PORT_BASE + 7)
    p = _cli("env", "--no-scontrol", env={"SLURM_JOB_NODELIST": "a[1-2]", "SLURM_JOB_ID": "9"})
    assert p.stdout.split("\n")[:2] == ["export MASTER_ADDR=a1", f"export MASTER_PORT={PORT_BASE + 9}"]
    assert _cli("output-dir", "unlearn", "--", "--output-dir", "o d").stdout == "o d\n"
    p = _cli("hostnames", "a[1-", "--no-scontrol")
    assert p.returncode == 2 and p.stderr.startswith("error:")


# ---------------------------------------------------------------------------------------------
# The batch scripts, run by bash with stand-ins for srun and scontrol
# ---------------------------------------------------------------------------------------------

FAKE_SRUN = r"""#!/bin/bash
# Stand-in for srun: records its command line, then behaves as $FAKE_MODE says.
# job.sh starts srun with SIGUSR1 ignored; the real srun installs its own handler over that, but
# bash cannot trap a signal ignored on entry, so the stand-in first re-executes itself with the
# signal at its default (a USR1 while it is still ignored is lost, as it is for the real srun).
if [[ -z ${FAKE_SRUN_READY:-} ]]; then
  export FAKE_SRUN_READY=1
  exec "$SYNTHUNLEARN_PYTHON" -c 'import os, signal, sys
signal.signal(signal.SIGUSR1, signal.SIG_DFL)
os.execv("/bin/bash", ["bash"] + sys.argv[1:])' "$0" "$@"
fi
echo "$*" > "$FAKE_LOG/srun.args"
case $FAKE_MODE in
  finish) exit 0 ;;
  stop)   mkdir -p "$FAKE_OUT"; echo '{"step": 3}' > "$FAKE_OUT/STOPPED"; exit 0 ;;
  crash)  exit 7 ;;
  signal) # like the ranks: on SIGUSR1 finish the step, write the marker, exit 0
          trap 'echo forwarded > "$FAKE_LOG/srun.signal"; mkdir -p "$FAKE_OUT";
                echo "{\"step\": 5}" > "$FAKE_OUT/STOPPED"; exit 0' USR1
          touch "$FAKE_LOG/srun.started"
          for _ in $(seq 600); do sleep 0.1; done; exit 9 ;;
  late)   # like a rank still importing: the first USR1 is lost, a repeated one is handled
          n=0
          trap 'n=$((n+1)); if ((n >= 2)); then echo "got $n" > "$FAKE_LOG/srun.signal"; mkdir -p "$FAKE_OUT";
                echo "{\"step\": 1}" > "$FAKE_OUT/STOPPED"; exit 0; fi' USR1
          touch "$FAKE_LOG/srun.started"
          for _ in $(seq 600); do sleep 0.1; done; exit 9 ;;
esac
"""
FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
[[ $1 == requeue ]] && exit "${FAKE_REQUEUE_RC:-0}"
exit 1   # `show hostnames` / `show job`: unavailable, the scripts must cope
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"

    def run(mode, *, job="unlearn", background=False, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
        env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_MODE=mode, FAKE_LOG=str(tmp_path), FAKE_OUT=str(out),
                   SLURM_JOB_ID="321", SLURM_JOB_NODELIST="cn[07-08]", SLURM_NTASKS="4", SLURM_JOB_NUM_NODES="2",
                   SLURM_SUBMIT_DIR=str(REPO), SYNTHUNLEARN_PYTHON=sys.executable, RANK="5", **extra)
        cmd = ["bash", str(SCRIPTS[job]), "--output-dir", str(out), "--max-steps", "9", "a.b=c d"]
        if background:
            return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    run.log = tmp_path
    run.out = out
    return run


def _calls(fake):
    path = fake.log / "scontrol.calls"
    return path.read_text().splitlines() if path.exists() else []


def test_finished_run_is_not_requeued(fake_slurm):
    p = fake_slurm("finish")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rendezvous cn07:" + str(PORT_BASE + 321) in p.stdout and "finished" in p.stdout
    args = (fake_slurm.log / "srun.args").read_text()
    assert "--kill-on-bad-exit=1" in args and "launch/unlearn.py --output-dir" in args and "a.b=c d" in args
    assert not any(c.startswith("requeue") for c in _calls(fake_slurm))


def test_repository_found_from_submission_dir(fake_slurm):
    # scontrol (the stand-in) cannot say where the script was submitted from: SLURM_SUBMIT_DIR is used
    p = fake_slurm("finish", job="sft")
    assert p.returncode == 0 and "launch/sft.py" in (fake_slurm.log / "srun.args").read_text()


def test_stopped_run_requeues_itself(fake_slurm):
    p = fake_slurm("stop")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "requeue 321" in _calls(fake_slurm) and "requeued job 321" in p.stdout


def test_stale_marker_does_not_requeue(fake_slurm):
    fake_slurm.out.mkdir()
    (fake_slurm.out / "STOPPED").write_text("{}")
    p = fake_slurm("finish")
    assert p.returncode == 0 and "requeue 321" not in _calls(fake_slurm)


def test_crash_is_not_requeued(fake_slurm):
    p = fake_slurm("crash")
    assert p.returncode == 7 and "requeue 321" not in _calls(fake_slurm)


def test_stopped_but_not_requeueable_exits_75(fake_slurm):
    p = fake_slurm("stop", FAKE_REQUEUE_RC="1")
    assert p.returncode == 75 and "Resubmit the same command" in p.stdout
    p = fake_slurm("stop", SLURM_RESTART_COUNT="3", SYNTHUNLEARN_MAX_REQUEUES="3")
    assert p.returncode == 75 and "requeue 321" not in _calls(fake_slurm)[-1:]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_the_batch_shell_is_forwarded_as_usr1(fake_slurm, sig):
    proc = fake_slurm("signal", background=True)
    deadline = time.monotonic() + 60
    while not (fake_slurm.log / "srun.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout
    assert (fake_slurm.log / "srun.signal").read_text().strip() == "forwarded"
    assert f"received SIG{sig.name[3:]}" in stdout and "requeue 321" in _calls(fake_slurm)


def test_stop_request_is_repeated_until_the_ranks_take_it(fake_slurm):
    proc = fake_slurm("late", background=True, SYNTHUNLEARN_STOP_RESEND_S="0.5")
    deadline = time.monotonic() + 60
    while not (fake_slurm.log / "srun.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout
    assert (fake_slurm.log / "srun.signal").read_text().strip() == "got 2"
    assert "requeue 321" in _calls(fake_slurm)


def test_stop_request_just_before_srun_pid_is_known_is_not_lost(fake_slurm, tmp_path):
    # A DEBUG trap (read from BASH_ENV before the script runs; -T so that it also runs in the
    # sourced job.sh) signals the batch shell right before `SRUN_PID=$!`: srun is running but the
    # stop handler cannot name it yet. The request must still reach the ranks (before the fix
    # srun ran on, and the job ended with its status 9), and not before srun can take it (sent at
    # once, it killed the stand-in srun before its handler was installed: status 138).
    hook = tmp_path / "hook.sh"
    hook.write_text("""set -T; trap '[[ $BASH_COMMAND == "SRUN_PID=\\$!" ]] && kill -USR1 $$' DEBUG\n""")
    p = fake_slurm("signal", BASH_ENV=str(hook), SYNTHUNLEARN_STOP_RESEND_S="2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (fake_slurm.log / "srun.signal").read_text().strip() == "forwarded"
    assert "received SIGUSR1" in p.stdout and "requeue 321" in _calls(fake_slurm)


def test_stop_request_just_after_srun_is_forked_does_not_kill_it(fake_slurm, tmp_path):
    # The batch shell is signalled right after `SRUN_PID=$!`, so the request is forwarded to an
    # srun forked an instant ago, before it can have installed its handler. srun starts with the
    # signal ignored: the first USR1 is lost and a repeat reaches it (before, the USR1 killed the
    # stand-in srun: status 138, the job not requeued).
    hook = tmp_path / "hook.sh"
    hook.write_text("""set -T; trap '[[ -n ${SRUN_PID:-} && $BASH_COMMAND == "[[ -n \\$STOP_REQUESTED ]]" ]] \\
        && kill -USR1 $$' DEBUG\n""")
    p = fake_slurm("signal", BASH_ENV=str(hook), SYNTHUNLEARN_STOP_RESEND_S="2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "received SIGUSR1" in p.stdout and "requeue 321" in _calls(fake_slurm), p.stdout + p.stderr
    assert (fake_slurm.log / "srun.signal").read_text().strip() == "forwarded"


def test_ranks_start_with_usr1_ignored(fake_slurm):
    # the real srun line runs each rank through `bash -c 'trap "" USR1; exec "$@"'`: check that an
    # ignored USR1 survives the exec, so a stop request during imports cannot kill a rank
    fake_slurm("finish")
    args = (fake_slurm.log / "srun.args").read_text()
    assert """trap "" USR1; exec "$@\"""" in args
    code = "import signal; print(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)"
    out = subprocess.run(["bash", "-c", 'trap "" USR1; exec "$@"', "rank", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "True"


def test_mismatched_tasks_and_gpus_is_refused(fake_slurm):
    p = fake_slurm("finish", SLURM_GPUS_PER_NODE="a100:4", SLURM_NTASKS_PER_NODE="2")
    assert p.returncode == 2 and "--ntasks-per-node=2 but --gpus-per-node=4" in p.stderr
    assert not (fake_slurm.log / "srun.args").exists()


def test_bad_launcher_arguments_fail_before_srun(fake_slurm, tmp_path):
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "1",
           "SLURM_JOB_NODELIST": "a", "SLURM_SUBMIT_DIR": str(REPO), "SYNTHUNLEARN_PYTHON": sys.executable,
           "FAKE_LOG": str(tmp_path)}
    p = subprocess.run(["bash", str(SCRIPTS["sft"]), "--max-steps", "many"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "--max-steps" in p.stderr
    assert not (tmp_path / "srun.args").exists()


def test_sbatch_scripts_differ_only_in_the_job():
    texts = {job: path.read_text() for job, path in SCRIPTS.items()}

    def generic(text, job, title):
        for prefix, suffix in (("slurm/", ".sbatch"), ("launch/", ".py"), ("synthunlearn-", ""), ("JOB=", "")):
            text = text.replace(f"{prefix}{job}{suffix}", f"{prefix}<job>{suffix}")
        return text.replace(f"synthunlearn {title} as", "synthunlearn <job> as")

    assert generic(texts["sft"], "sft", "SFT") == generic(texts["unlearn"], "unlearn", "unlearning")
    for text in texts.values():
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
        assert "#SBATCH --partition" not in text and "#SBATCH --account" not in text  # site-specific
    for path in [*SCRIPTS.values(), REPO / "launch/slurm/job.sh"]:
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
