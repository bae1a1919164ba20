"""Processes a benchmark starts: start with a log file, read their peak memory, stop exactly them."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..bringup import param_arg
from ..processes import INT_GRACE_S, ChildProcesses


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process in MB; None when it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def param_args(params: dict[str, object]) -> list[str]:
    """-p name:=value arguments (the same rendering bringup uses)."""
    out: list[str] = []
    for k, v in params.items():
        out += ["-p", param_arg(k, v)]
    return out


def node_command(module: str, namespace: str = "/", params: dict[str, object] | None = None,
                 params_file: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", module, "--ros-args", "-r", f"__ns:={namespace}"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    return cmd + param_args(params or {})


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    peak_rss_mb: float | None = None


class ProcessGroup:
    """Started together, stopped together (SIGINT, SIGTERM, SIGKILL); never touches other processes.
    Each process runs in its own session and stops itself if the benchmark dies
    (processes.ChildProcesses)."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._children = ChildProcesses(env)
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None, cpus: str | None = None) -> Proc:
        """cpus: pin the process to these CPUs (taskset -c, e.g. "0"), as if it had a device of its own.
        taskset execs the command, so the process started is the node itself."""
        if cpus:
            cmd = ["taskset", "-c", cpus, *cmd]
        with open(self.log_dir / f"{name}.log", "w") as out:
            p = self._children.start(name, cmd, env=env or self.env, stdout=out, stderr=subprocess.STDOUT)
        proc = Proc(name, p)
        self.procs.append(proc)
        return proc

    def dead(self) -> list[tuple[str, int]]:
        return [(p.name, p.popen.returncode) for p in self.procs if p.popen.poll() is not None]

    def sample_rss(self) -> None:
        for p in self.procs:
            v = peak_rss_mb(p.popen.pid)
            if v is not None:
                p.peak_rss_mb = max(v, p.peak_rss_mb or 0.0)

    def stop_one(self, proc: Proc, timeout: float = INT_GRACE_S) -> int | None:
        v = peak_rss_mb(proc.popen.pid)
        if v is not None:
            proc.peak_rss_mb = max(v, proc.peak_rss_mb or 0.0)
        self._children.stop([proc.popen], int_grace=timeout)
        return proc.popen.returncode

    def wait_exit(self, proc: Proc, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while proc.popen.poll() is None and time.monotonic() < deadline:
            v = peak_rss_mb(proc.popen.pid)
            if v is not None:
                proc.peak_rss_mb = max(v, proc.peak_rss_mb or 0.0)
            time.sleep(0.2)
        return proc.popen.poll()

    def stop(self, timeout: float = INT_GRACE_S) -> dict[str, float | None]:
        """Stop every process; returns {name: peak RSS MB}."""
        self.sample_rss()
        self._children.stop(int_grace=timeout)
        return {p.name: (round(p.peak_rss_mb, 1) if p.peak_rss_mb else None) for p in self.procs}

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def bench_env(base: dict[str, str], threads: int) -> dict[str, str]:
    """One intra-op thread per process by default: edge and server then each own a core, as they
    would own a device, instead of every process spreading over every core."""
    env = dict(base)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
