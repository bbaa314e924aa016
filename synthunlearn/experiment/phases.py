"""One phase of the experiment: its launcher command, whether it is done, and running it.

A phase is one launcher run (``deepspeed --num_gpus N launch/<job>.py ...``, or ``python
launch/<job>.py ...`` with ``launcher: python``); :mod:`synthunlearn.experiment.pipeline` plans
the phases and runs them in dependency order.

Resumption: a phase directory holding ``final/`` and a ``phase.json`` whose command and inputs
digest equal the ones the pipeline would run now is reused; anything else is rerun from scratch
(``--overwrite``, its old ``phase.json`` and ``eval.json`` removed first). The inputs are what the
command names only by path (:func:`inputs_digest`): the run config as the launcher resolves it,
the contents of every file and model directory it names, and the DeepSpeed JSON, so editing a run
config or the DeepSpeed JSON reruns the phases that use it. (The pipeline caches evaluations the
same way, and stamps the world and the initial model.)

Branching a sweep (``reuse_from: <another output_dir>``): a phase that is not done here is taken
from the same place in that directory when its recorded command, read with that directory's path
in place of this one, and its inputs digest equal this run's. Its ``final/`` files are hard-linked
(copied across file systems) and its records copied, so a sweep of, say, the SFT budget retrains
nothing upstream of SFT. Nothing there is ever written: every later write here replaces files
(``--overwrite`` unlinks, exports and JSON writes rename), never rewrites a linked one in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Sequence

from synthunlearn import environment
from synthunlearn.errors import ConfigError
from synthunlearn.experiment.config import REPO, output_path

_PORTS_HANDED_OUT: set = set()
_PORTS_LOCK = threading.Lock()


def _free_port() -> int:
    """A port that is free now for a launcher's rendezvous and that no earlier phase of this process
    was given: with ``parallel_jobs > 1`` a launcher binds its port seconds after it starts, and
    meanwhile the kernel may offer the same free port to the phase started next."""
    with _PORTS_LOCK:
        for _ in range(1000):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _PORTS_HANDED_OUT:
                _PORTS_HANDED_OUT.add(port)
                return port
    raise RuntimeError("no free local port for a launcher's rendezvous that this run has not used")


def job_env(omp_threads: int = 1) -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.setdefault("SYNTHUNLEARN_CACHE", str(REPO / ".cache" / "synthunlearn"))
    env.setdefault("DS_ACCELERATOR", "cpu" if not shutil.which("nvidia-smi") else "cuda")
    # Each rank gets its own thread budget; ranks x threads should not exceed the cores.
    env["OMP_NUM_THREADS"] = str(omp_threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def override_args(values: dict) -> List[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


@dataclasses.dataclass
class Phase:
    """One launcher run."""

    name: str                   # e.g. "seed0/sft/synthetic"
    job: str                    # "sft" or "unlearn"
    out_dir: Path
    config: str
    max_steps: int
    seed: int
    overrides: Dict[str, object]
    deps: List[str]
    evaluated: bool = False     # an arm's last phase: its model is the one the evaluation scores

    def args(self) -> List[str]:
        return ["--config", self.config, "--output-dir", str(self.out_dir), "--max-steps", str(self.max_steps),
                "--seed", str(self.seed), *override_args(self.overrides)]


def _interpreter() -> str:
    """This interpreter as an absolute path. ``sys.executable`` is relative when the interpreter
    was found through a relative PATH entry (``PATH=.venv/bin:$PATH python ...``); phases run with
    ``cwd=REPO`` and their reuse stamp records the command, so a relative path would fail from
    another directory and make the same interpreter look new, rerunning (and overwriting) every
    finished phase. Made absolute, not resolved: a virtualenv's python is a symlink whose target
    runs outside the environment."""
    return os.path.abspath(sys.executable)


def launcher_command(cfg: dict, phase: Phase) -> List[str]:
    script = str(REPO / "launch" / f"{phase.job}.py")
    if cfg["launcher"] == "python":
        return [_interpreter(), script, *phase.args()]
    found = shutil.which("deepspeed", path=str(Path(_interpreter()).parent))
    deepspeed = os.path.abspath(found) if found else "deepspeed"
    return [deepspeed, "--num_gpus", str(cfg["nprocs"]), "--master_port", "{port}", script,
            "--deepspeed-config", str(REPO / cfg["deepspeed_config"]), *phase.args()]


def _launcher_args(phase: Phase, command: Sequence[str]) -> List[str]:
    """What the phase's launcher script is given: the arguments after it in ``command``, or, with
    no command, the phase's own (all the ``python`` launcher gives it)."""
    if not command:
        return phase.args()
    command = [str(c) for c in command]
    return command[command.index(str(REPO / "launch" / f"{phase.job}.py")) + 1:]


def _input_path(spec: str) -> Path:
    """A path as the launchers read it: they run with ``cwd=REPO``, so a relative one is relative
    to the checkout, whatever directory the pipeline was started from."""
    path = Path(spec).expanduser()
    return path if path.is_absolute() else REPO / path


def _hash_contents(digest, path: Path) -> None:
    """A file's bytes, or a directory's (a model's ``final/``, a ``save_to_disk`` data set):
    every file under it with its relative name, so no weight shard or tokenizer file is left out."""
    import hashlib

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        one = hashlib.sha1()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                one.update(block)
        name = "" if file == path else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{one.hexdigest()}\n".encode())


def _is_path_key(name: str) -> bool:
    return name == "path" or name.endswith("_path")


def inputs_digest(phase: Phase, command: Sequence[str] = ()) -> str:
    """Digest of everything the phase's launcher runs with beyond its command line.

    The command alone is not enough: the run config and DeepSpeed JSON are named by path and
    edited in place, data files are rewritten in place when the experiment's data knobs change,
    and an upstream phase that reran leaves its ``final/`` at the same path. So the digest holds

    - the run config as the launcher resolves it (``synthunlearn.cli.parse_args`` on the
      launcher's arguments, then ``load_config``: the file, the overrides, ``--max-steps`` and
      ``--seed``, and every default), so an edit of the file reruns the phases that use it;
    - the contents of every file or directory that resolved config names (``model.path``,
      ``data.<set>.path`` / ``eval_path`` / ``files[i].path``, ...), in place of its path, so the
      digest is the same wherever the run directory is (``reuse_from`` compares it across two);
      a ``builtin:`` asset counts by its name (it ships with the code);
    - the DeepSpeed JSON the launcher is given (``--deepspeed-config``, else its default).

    Relative paths are read from the checkout, as the launchers (run with ``cwd=REPO``) read them;
    a named file that does not exist is a :class:`ConfigError`, never silently left out.
    ``command`` is the phase's launcher command; without it, the phase's own arguments."""
    import hashlib

    from synthunlearn.cli import parse_args
    from synthunlearn.config import load_config, to_dict
    from synthunlearn.tiny_model import BUILTIN_PREFIX

    args = parse_args(phase.job, _launcher_args(phase, command))
    resolved = to_dict(load_config(_input_path(args.config), args.overrides))
    named = []

    def take_paths(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            dotted = f"{prefix}[{key}]" if isinstance(node, list) else f"{prefix}.{key}" if prefix else key
            if isinstance(node, dict) and _is_path_key(key) and isinstance(value, str) \
                    and not value.startswith(BUILTIN_PREFIX):
                named.append((dotted, value))
                node[key] = "<contents below>"
            else:
                take_paths(value, dotted)

    take_paths(resolved, "")
    digest = hashlib.sha1(json.dumps(resolved, sort_keys=True).encode())
    for key, spec in named:
        path = _input_path(spec)
        if not path.exists():
            raise ConfigError(f"{phase.name}: {key}: {spec!r} does not exist ({path})")
        digest.update(f"\n{key}\n".encode())
        _hash_contents(digest, path)
    deepspeed = _input_path(args.deepspeed_config)
    try:
        settings = json.loads(deepspeed.read_text())
    except OSError as error:
        raise ConfigError(f"{phase.name}: deepspeed_config: cannot read {deepspeed} ({error.strerror})") from None
    except ValueError as error:
        raise ConfigError(f"{phase.name}: deepspeed_config: {deepspeed}: not valid JSON ({error})") from None
    # Parsed and re-dumped: reformatting the file changes nothing the launcher sees.
    digest.update(b"\ndeepspeed\n" + json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def phase_done(phase: Phase, command: List[str]) -> bool:
    stamp = phase.out_dir / "phase.json"
    if not (phase.out_dir / "final" / "config.json").exists() or not stamp.exists():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        return False
    return recorded.get("command") == command and recorded.get("inputs") == inputs_digest(phase, command)


def relocate(text: str, source: Path, out: Path) -> str:
    """``text`` (a command element or a signature) with the source directory's path read as ours."""
    src, dst = str(source), str(out)
    return dst if text == src else text.replace(src + os.sep, dst + os.sep)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:   # another file system, or links not allowed there
        shutil.copy2(src, dst)


def adopt_phase(phase: Phase, command: List[str], out: Path, source: Path) -> bool:
    """Takes ``phase`` from the experiment in ``source`` when that one ran exactly this command on
    these inputs (module docstring, "Branching a sweep"); returns whether it did.

    Only ``final/`` is linked: it is replaced as a whole whenever a phase reruns (the launchers
    export to ``final.tmp`` and rename; ``--overwrite`` deletes it), so the source's files are
    never written through a link. The records beside it are copied."""
    src_dir = source / phase.out_dir.relative_to(out)
    stamp = src_dir / "phase.json"
    if not (src_dir / "final" / "config.json").exists() or not stamp.exists():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except ValueError:
        return False
    if [relocate(str(c), source, out) for c in recorded.get("command") or []] != command:
        return False
    if recorded.get("inputs") != inputs_digest(phase, command):
        return False
    if phase.out_dir.exists():
        shutil.rmtree(phase.out_dir)
    phase.out_dir.mkdir(parents=True)
    shutil.copytree(src_dir / "final", phase.out_dir / "final", copy_function=_link_or_copy)
    for name in ("run_config.json", "metrics.jsonl"):
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, phase.out_dir / name)
    src_log = src_dir.parent / f"{src_dir.name}.log"
    if src_log.is_file():
        shutil.copy2(src_log, phase.out_dir.parent / src_log.name)
    (phase.out_dir / "phase.json").write_text(json.dumps(
        {"command": command, "inputs": recorded["inputs"], "seconds": recorded.get("seconds", 0.0),
         "reused_from": str(src_dir), "environment": recorded.get("environment")}, indent=1))
    return True


def run_phase(cfg: dict, phase: Phase, log) -> float:
    """Runs one phase (or reuses it, here or from ``reuse_from``); returns its wall seconds (0 when reused)."""
    command = launcher_command(cfg, phase)
    if phase_done(phase, command):
        log(f"{phase.name}: reused ({phase.out_dir}/final)")
        return 0.0
    if cfg.get("reuse_from") is not None:
        out, source = output_path(cfg["output_dir"]), output_path(cfg["reuse_from"])
        if adopt_phase(phase, command, out, source):
            log(f"{phase.name}: reused from {source / phase.out_dir.relative_to(out)}")
            return 0.0
    phase.out_dir.mkdir(parents=True, exist_ok=True)
    # The old records go before the launcher replaces final/: --overwrite leaves them, and an
    # interruption after the new final/ is exported but before phase.json is rewritten would
    # leave the old stamp vouching for the new model (and the old evaluation scoring it), so
    # going back to the old settings would reuse a model they did not train.
    for record in ("phase.json", "eval.json"):
        (phase.out_dir / record).unlink(missing_ok=True)
    concrete = [c.replace("{port}", str(_free_port())) for c in command] + ["--overwrite"]
    log(f"{phase.name}: {phase.job} {phase.max_steps} steps")
    # What trains this phase (commit, package versions, host), read as the launcher starts and
    # kept in phase.json: a reused phase keeps its own, so a results.json assembled from several
    # invocations still says where each model came from.
    trained_on = environment.describe()
    # Read before the launcher starts: a run config edited while the phase trains must not be
    # recorded as what it trained with.
    inputs = inputs_digest(phase, command)
    start = time.perf_counter()
    # The log lives beside the phase directory: --overwrite empties the directory itself.
    log_path = phase.out_dir.parent / f"{phase.out_dir.name}.log"
    with open(log_path, "w") as handle:
        proc = subprocess.run(concrete, cwd=REPO, env=job_env(int(cfg["omp_threads"])), stdout=handle,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not (phase.out_dir / "final" / "config.json").exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{phase.name}: {' '.join(concrete)} exited {proc.returncode}\n{tail}")
    (phase.out_dir / "phase.json").write_text(json.dumps({"command": command, "inputs": inputs,
                                                          "seconds": seconds, "environment": trained_on},
                                                         indent=1))
    log(f"{phase.name}: done in {seconds:.0f} s")
    return seconds
