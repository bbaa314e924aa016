"""SLURM glue for ``launch/slurm/*.sbatch``: node lists, rendezvous address/port, requeue decisions.

The batch scripts stay thin shell; everything with logic lives here so that it is unit-testable
without a cluster. This module imports only the standard library (and ``synthunlearn.cli`` for
the launchers' own argument parser), so ``python -m synthunlearn.slurm ...`` is fast and works
before torch is imported anywhere.

    python -m synthunlearn.slurm hostnames   [NODELIST]   one host per line (default $SLURM_JOB_NODELIST)
    python -m synthunlearn.slurm master-addr [NODELIST]   the first host of the node list
    python -m synthunlearn.slurm master-port [JOB_ID]     the rendezvous port derived from the job id
    python -m synthunlearn.slurm env                      `export MASTER_ADDR=...` lines for `eval`
    python -m synthunlearn.slurm output-dir JOB -- ARGS   the --output-dir the launcher will use
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Iterable, Mapping

# Ports handed out from the job id. Below Linux's default ephemeral range (32768-60999), so a port
# is not already taken by some outgoing connection, and above the well-known/registered ports that
# daemons (including slurmctld/slurmd at 6817/6818) usually sit on.
PORT_BASE = 15000
PORT_SPAN = 15000

# Written by the trainer (rank 0) into the output directory when it stopped on SIGTERM/SIGUSR1
# after a checkpoint, i.e. it exited 0 *without* finishing. The batch script requeues only then.
STOPPED_MARKER = "STOPPED"


class HostlistError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Node lists
# ---------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Splits on commas (and whitespace) that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"nested brackets in host list {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unbalanced ']' in host list {text!r}")
        if depth == 0 and (ch == "," or ch.isspace()):
            if current:
                parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if depth != 0:
        raise HostlistError(f"unbalanced '[' in host list {text!r}")
    if current:
        parts.append("".join(current))
    return parts


def _expand_range_set(spec: str, whole: str) -> list[str]:
    """'01-04,07' -> ['01', '02', '03', '04', '07']; zero padding follows the lower bound's width."""
    values = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise HostlistError(f"empty range in host list {whole!r}")
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise HostlistError(f"bad range {item!r} in host list {whole!r}")
            if int(hi) < int(lo):
                raise HostlistError(f"descending range {item!r} in host list {whole!r}")
            # SLURM pads to the width of the lower bound when it has a leading zero ('01-10' -> 01..10)
            width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
            values.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            if not item.isdigit():
                raise HostlistError(f"bad index {item!r} in host list {whole!r}")
            values.append(item)
    return values


_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _expand_one(pattern: str, whole: str) -> list[str]:
    """One host expression, possibly with several bracket groups: 'r[1-2]n[1-2]' is their product."""
    match = _BRACKET.search(pattern)
    if match is None:
        if "[" in pattern or "]" in pattern:
            raise HostlistError(f"unbalanced brackets in host list {whole!r}")
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [head + value + rest
            for value in _expand_range_set(match.group(1), whole)
            for rest in _expand_one(tail, whole)]


def expand_hostlist(nodelist: str) -> list[str]:
    """Expands a SLURM host list the way ``scontrol show hostnames`` does, keeping order and duplicates.

    >>> expand_hostlist("gpu[01-04,07]")
    ['gpu01', 'gpu02', 'gpu03', 'gpu04', 'gpu07']
    >>> expand_hostlist("n[1-3]-ib,login")
    ['n1-ib', 'n2-ib', 'n3-ib', 'login']
    """
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_one(part, nodelist))
    return hosts


def hostnames(nodelist: str | None = None, *, use_scontrol: bool = True,
              environ: Mapping[str, str] | None = None) -> list[str]:
    """The job's hosts: ``scontrol show hostnames`` when it answers (it knows the installed SLURM's
    syntax), else our parser: also when scontrol has no configuration to read, and when it rejects
    a list (SLURM 22.05 prints "Invalid hostlist" for a suffix after brackets, as in n[1-3]-ib)."""
    environ = os.environ if environ is None else environ
    if nodelist is None:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise HostlistError("no node list: pass one or run inside a SLURM job (SLURM_JOB_NODELIST unset)")
    if use_scontrol and shutil.which("scontrol"):
        try:
            proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                  text=True, timeout=30)
            if proc.returncode == 0 and proc.stdout.split():
                return proc.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass  # fall back to the parser: a slow or broken scontrol must not stop the job
    return expand_hostlist(nodelist)


# ---------------------------------------------------------------------------------------------
# Rendezvous
# ---------------------------------------------------------------------------------------------

def master_port(job_id: str | int) -> int:
    """A port every node computes alike from the job id (no communication needed). Jobs that share
    a node get different ports unless their ids differ by a multiple of PORT_SPAN; a requeued job
    keeps its id and so its port."""
    # SLURM_JOB_ID is a plain number, also for array tasks (each has its own id)
    if not str(job_id).strip().isdigit():  # not int(): it would read '12_3' as 123
        raise HostlistError(f"job id {job_id!r} is not a number")
    jid = int(str(job_id))
    return PORT_BASE + jid % PORT_SPAN


def rendezvous(environ: Mapping[str, str] | None = None, *, use_scontrol: bool = True) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for the job. SYNTHUNLEARN_MASTER_ADDR / _PORT override (e.g. an
    InfiniBand host name, or a port the site firewall allows); plain MASTER_* from the submitting
    shell are deliberately ignored, since sbatch exports the whole environment and a stale value
    from an earlier interactive torchrun would silently break the rendezvous."""
    environ = os.environ if environ is None else environ
    addr = environ.get("SYNTHUNLEARN_MASTER_ADDR") or hostnames(environ=environ, use_scontrol=use_scontrol)[0]
    port = environ.get("SYNTHUNLEARN_MASTER_PORT")
    if not port:
        job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
        if not job_id:
            raise HostlistError("SLURM_JOB_ID unset: run inside a SLURM job or set SYNTHUNLEARN_MASTER_PORT")
        port = str(master_port(job_id))
    return {"MASTER_ADDR": addr, "MASTER_PORT": port}


# ---------------------------------------------------------------------------------------------
# Launcher arguments
# ---------------------------------------------------------------------------------------------

def output_dir(job: str, argv: Iterable[str]) -> str:
    """The --output-dir the launcher will use for these arguments, decided by the launcher's own
    parser (abbreviations like --output and its default included)."""
    from synthunlearn.cli import build_parser

    args, _ = build_parser(job).parse_known_args(list(argv))
    return args.output_dir


# ---------------------------------------------------------------------------------------------
# Command line for the batch scripts
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synthunlearn.slurm",
                                description="SLURM helpers used by launch/slurm/*.sbatch")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("hostnames", "master-addr"):
        s = sub.add_parser(name)
        s.add_argument("nodelist", nargs="?", default=None, help="default: $SLURM_JOB_NODELIST")
        s.add_argument("--no-scontrol", action="store_true", help="use the built-in parser only")
    s = sub.add_parser("master-port")
    s.add_argument("job_id", nargs="?", default=None, help="default: $SLURM_JOB_ID")
    s = sub.add_parser("env")
    s.add_argument("--no-scontrol", action="store_true")
    s = sub.add_parser("output-dir")
    s.add_argument("job", choices=["sft", "unlearn"])
    s.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    try:
        if a.cmd == "hostnames":
            print("\n".join(hostnames(a.nodelist, use_scontrol=not a.no_scontrol)))
        elif a.cmd == "master-addr":
            print(hostnames(a.nodelist, use_scontrol=not a.no_scontrol)[0])
        elif a.cmd == "master-port":
            job_id = a.job_id or os.environ.get("SLURM_JOB_ID")
            if not job_id:
                raise HostlistError("no job id: pass one or run inside a SLURM job")
            print(master_port(job_id))
        elif a.cmd == "env":
            for key, value in rendezvous(use_scontrol=not a.no_scontrol).items():
                print(f"export {key}={shlex.quote(value)}")
        elif a.cmd == "output-dir":
            rest = a.args[1:] if a.args[:1] == ["--"] else a.args
            print(output_dir(a.job, rest))
    except HostlistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
