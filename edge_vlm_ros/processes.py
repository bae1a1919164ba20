"""How every command of this package starts processes and how they all stop: one place for the rules.

A launcher (bringup, the demo, the evaluators, the benchmarks and their workers) starts its children
with `ChildProcesses` and wraps its `main` in `@launcher_main`:
- SIGINT, SIGTERM and SIGHUP (Ctrl-C, `kill`, `systemctl stop`, `docker stop`, a closed terminal)
  raise `Stopped` in the launcher's main thread, so its `finally` blocks stop exactly the processes
  it started, and `main` returns 128 + the signal number.
- Stopping a child is bounded: SIGINT, wait, SIGTERM, wait, SIGKILL. A signal that arrives while
  children are being stopped is remembered, not raised, so the stop always finishes.
- Each child runs in its own session (a terminal's Ctrl-C reaches only the launcher, which stops
  the children in order) and learns its launcher's pid from `EDGE_VLM_PARENT_PID`. The child calls
  `die_with_parent()` when it starts (the package's __init__ does, on the first import of
  edge_vlm_ros, before torch or rclpy load): the kernel then sends it SIGTERM when the launcher
  dies, even by SIGKILL (Linux PR_SET_PDEATHSIG), and a thread watching the parent pid does the
  same where prctl is unavailable. A child whose launcher died before it armed itself stops at once.

A node process (spin.run_node) uses `NodeStop`, installed when the package is first imported (before
torch and rclpy load; a signal then ends the process at once, exit code 0, as nothing has started
yet): the same three signals end its spin loop, and the
node is destroyed and rclpy shut down before the process exits with code 0; whatever blocks that,
the process is gone STOP_DEADLINE_S after the first signal (exit code 1, every thread's stack on
stderr), inside `ros2 launch`'s 5 s before it escalates to SIGTERM.

Children must be started from a thread that lives as long as they should (the main thread): the
kernel's parent-death signal follows the thread that forked the child.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

PARENT_ENV = "EDGE_VLM_PARENT_PID"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INT_GRACE_S = 5.0      # after SIGINT: a node stops within 2 s; the rest is for a loaded machine
TERM_GRACE_S = 3.0     # after SIGTERM, before SIGKILL
KILL_WAIT_S = 5.0      # after SIGKILL (the kernel only has to reap)
PARENT_POLL_S = 0.5    # the parent-watch thread's period
STOP_DEADLINE_S = 4.0  # a node process: first stop signal -> exit, at most (ros2 launch escalates after 5 s)
_PR_SET_PDEATHSIG = 1


class Stopped(BaseException):
    """A stop signal arrived. BaseException (like KeyboardInterrupt), so `except Exception` in the
    code it interrupts does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# ---- launcher side ---------------------------------------------------------------------------
class _LauncherSignals:
    """Process-wide state of the launcher's handlers (signal handlers run in the main thread)."""

    def __init__(self) -> None:
        self.installed = False
        self.received: int | None = None   # the first stop signal
        self.raised = False                # Stopped is raised at most once per process
        self.deferring = 0                 # > 0 while children are being stopped

    def handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
        if self.raised or self.deferring:
            return
        self.raised = True
        raise Stopped(signum)

    def reset(self) -> None:
        self.received, self.raised, self.deferring = None, False, 0


_launcher = _LauncherSignals()


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise Stopped in the main thread (once). Outside the main
    thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread() or _launcher.installed:
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _launcher.reset()
    _launcher.installed = True
    for s in STOP_SIGNALS:
        signal.signal(s, _launcher.handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _launcher.installed = False


@contextlib.contextmanager
def deferred_stop() -> Iterator[None]:
    """A section that a stop signal must not cut short (stopping children). A signal that arrives
    inside raises Stopped when the section ends, unless one was raised already."""
    _launcher.deferring += 1
    try:
        yield
    finally:
        _launcher.deferring -= 1
    if (not _launcher.deferring and _launcher.installed and _launcher.received is not None
            and not _launcher.raised and threading.current_thread() is threading.main_thread()):
        _launcher.raised = True
        raise Stopped(_launcher.received)


def launcher_main(main: Callable[..., int]) -> Callable[..., int]:
    """Decorates a command's main(argv) -> exit code: stop signals raise Stopped inside it (its
    finally blocks stop what it started) and main then returns 128 + the signal number."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        with stop_signals():
            try:
                return main(*args, **kwargs)
            except Stopped as e:
                name = main.__module__
                if name == "__main__":   # python -m edge_vlm_ros.x: the module's real name
                    spec = getattr(sys.modules["__main__"], "__spec__", None)
                    name = spec.name if spec is not None else os.path.basename(sys.argv[0])
                print(f"{name}: {e}; stopped every process it started, exit code {e.exit_code}",
                      file=sys.stderr, flush=True)
                return e.exit_code

    return wrapper


def stop_processes(procs: Sequence[subprocess.Popen], int_grace: float = INT_GRACE_S,
                   term_grace: float = TERM_GRACE_S) -> None:
    """Stop exactly these processes: SIGINT, up to int_grace s; SIGTERM, up to term_grace s; SIGKILL.
    Every process is reaped (no zombies); a stop signal arriving meanwhile does not interrupt."""
    with deferred_stop():
        alive = list(procs)
        for sig, grace in ((signal.SIGINT, int_grace), (signal.SIGTERM, term_grace), (signal.SIGKILL, KILL_WAIT_S)):
            alive = [p for p in alive if p.poll() is None]
            if not alive:
                return
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
            deadline = time.monotonic() + grace
            for p in alive:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.05, deadline - time.monotonic()))


class ChildProcesses:
    """Processes started together and stopped together; never touches any other process."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: Sequence[str], *, env: dict[str, str] | None = None,
              stdout: IO[Any] | int | None = None, stderr: IO[Any] | int | None = None,
              cwd: str | os.PathLike[str] | None = None, **popen_kwargs: Any) -> subprocess.Popen:
        """Start cmd in its own session with this process as its registered parent (PARENT_ENV)."""
        full_env = child_env(self.env if env is None else env)
        with deferred_stop():   # a signal here must not leave a started process unregistered
            p = subprocess.Popen(list(cmd), env=full_env, stdout=stdout, stderr=stderr, cwd=cwd,
                                 start_new_session=True, **popen_kwargs)
            self.procs.append((name, p))
        return p

    def poll(self) -> list[tuple[str, int]]:
        """(name, returncode) of the processes that have exited."""
        return [(n, p.returncode) for n, p in self.procs if p.poll() is not None]

    def stop(self, procs: Sequence[subprocess.Popen] | None = None, int_grace: float = INT_GRACE_S,
             term_grace: float = TERM_GRACE_S) -> None:
        """Stop these (default: all) of the started processes; see stop_processes."""
        stop_processes([p for _, p in self.procs] if procs is None else procs, int_grace, term_grace)

    def __enter__(self) -> ChildProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """env (default os.environ) plus PARENT_ENV naming this process: for a child that calls
    die_with_parent()."""
    out = dict(os.environ if env is None else env)
    out[PARENT_ENV] = str(os.getpid())
    return out


# ---- child side ------------------------------------------------------------------------------
def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _ancestors(pid: int) -> list[int]:
    """pid and its ancestors up to init, from /proc (empty where /proc does not exist)."""
    out: list[int] = []
    while pid > 1 and len(out) < 64:
        out.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def die_with_parent(sig: int = signal.SIGTERM, use_prctl: bool = True) -> bool:
    """In a child started through ChildProcesses: get `sig` when the launcher dies, however it dies.

    Arms the kernel's parent-death signal (Linux) and a daemon thread that polls the parent pid (the
    portable fallback), then checks the parent is still the launcher, so a launcher that died
    before this call is noticed too. PARENT_ENV is removed from os.environ: it names this process's
    parent, not that of anything this process starts. Returns False when no launcher is registered
    (started by hand, by `ros2 run` or `ros2 launch`). use_prctl=False leaves only the watch thread
    (how it behaves where prctl does not exist)."""
    value = os.environ.pop(PARENT_ENV, "")
    if not value.isdigit():
        return False
    parent = int(value)
    if use_prctl:
        _set_parent_death_signal(sig)

    def orphaned() -> bool:
        # `taskset` and `ip netns exec` exec the command, so the launcher is the direct parent; a
        # wrapper that forks instead sits between them, and then the launcher is a further ancestor
        return os.getppid() != parent and parent not in _ancestors(os.getppid())

    def watch() -> None:
        while not orphaned():
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), sig)

    if orphaned():
        os.kill(os.getpid(), sig)
    else:
        threading.Thread(target=watch, name="edge_vlm_parent_watch", daemon=True).start()
    return True


class NodeStop:
    """Stop signals of a node process: before `spinning` is set (construction, model loading) they
    raise Stopped so a slow start is cut short; afterwards they only set `requested`, which the spin
    loop checks at least every spin period, so no callback is interrupted halfway.

    A Python signal handler runs only in the main thread, between two bytecodes: while the main
    thread sits in one long C call (loading weights, building a simulator, a DDS call, a lock that
    cleanup never gets) the stop waits for that call. So the first stop signal is also noticed by a
    thread woken by the interpreter's C-level handler (signal.set_wakeup_fd), which sets
    `requested` and arms a deadline: if the process has not exited `deadline_s` after the signal,
    faulthandler's watchdog thread (C, needs neither the GIL nor the main thread) prints every
    thread's stack to stderr, where the log shows what held the stop, and ends the process with
    exit code 1. The deadline is shorter than `ros2 launch`'s sigterm_timeout (5 s), so launch
    never has to escalate. (A C call that holds the GIL delays the watcher too, until it returns.)"""

    def __init__(self, deadline_s: float = STOP_DEADLINE_S) -> None:
        self.requested = threading.Event()
        self.signum: int | None = None
        self.started = False     # run_node has begun (rclpy.init): below, only modules are importing
        self.spinning = False
        self.deadline_s = deadline_s
        self._armed = threading.Lock()
        self._deadline_set = False

    def _handler(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        self.arm_deadline()
        self.requested.set()
        if first and not self.started:
            # still importing torch, transformers, rclpy: nothing to clean up, and an exception here
            # would only add a traceback and seconds of interpreter teardown (exit code -2)
            os._exit(0)
        if first and not self.spinning:
            raise Stopped(signum)

    def arm_deadline(self) -> None:
        """Start the stop deadline (once): after deadline_s, stacks to stderr and exit code 1."""
        with self._armed:
            if self._deadline_set:
                return
            self._deadline_set = True
        faulthandler.dump_traceback_later(self.deadline_s, exit=True)

    def _watch(self, fd: int) -> None:
        stops = {int(s) for s in STOP_SIGNALS}
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            if any(b in stops for b in data):
                self.arm_deadline()
                self.requested.set()

    def install(self) -> None:
        """Install the handlers and the wakeup watcher (main thread only)."""
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(r,), name="edge_vlm_stop_watch", daemon=True).start()


_node_stop: NodeStop | None = None


def node_stop() -> NodeStop:
    """This process's NodeStop, installed on the first call (from the main thread)."""
    global _node_stop
    if _node_stop is None:
        _node_stop = NodeStop()
        _node_stop.install()
    return _node_stop


def is_node_process(argv: Sequence[str] | None = None) -> bool:
    """Whether this process runs one of the package's nodes: `python -m edge_vlm_ros.<x>_node` or an
    installed entry point lib/edge_vlm_ros/<x>_node (what `ros2 run` and `ros2 launch` start)."""
    args = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)[1:]
    while args and args[0].startswith("-") and args[0] not in ("-m", "-c"):
        args = args[1:] if args[0] not in ("-X", "-W") else args[2:]
    if not args or args[0] == "-c":
        return False
    if len(args) >= 2 and args[0] == "-m":
        return args[1].startswith("edge_vlm_ros.") and args[1].endswith("_node")
    return args[0].endswith("_node") and os.path.basename(os.path.dirname(args[0])) == "edge_vlm_ros"
