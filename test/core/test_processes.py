"""processes.py with plain Python child processes (no ROS): stop escalation, launcher exit codes,
children that end with their launcher (parent-death signal, and the parent-watch fallback alone)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from edge_vlm_ros.processes import PARENT_ENV, ChildProcesses, child_env

# `python -S` would skip the venv's site hooks; the children need the package, so the normal start.
PY = [sys.executable, "-c"]


def _alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float) -> float | None:
    """Seconds until pid is gone, None if it is still alive after timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not _alive(pid):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _read_line(p: subprocess.Popen, timeout: float = 30.0) -> str:
    t0 = time.monotonic()
    line = p.stdout.readline()
    assert line, f"no output within {timeout} s (exit {p.poll()})"
    assert time.monotonic() - t0 < timeout
    return line.decode().strip()


def test_stop_escalates_int_term_kill_and_touches_only_its_own():
    # dies of SIGINT (its default handler set explicitly: a shell's background job inherits SIGINT ignored)
    obedient = ("import signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                "print('up', flush=True)\ntime.sleep(60)\n")
    stubborn = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)\n")
    bystander = subprocess.Popen([*PY, obedient], stdout=subprocess.PIPE)
    children = ChildProcesses()
    try:
        a = children.start("obedient", [*PY, obedient], stdout=subprocess.PIPE)
        b = children.start("stubborn", [*PY, stubborn], stdout=subprocess.PIPE)
        for p in (a, b, bystander):
            assert _read_line(p) == "up"
        t0 = time.monotonic()
        # (grace long enough for a loaded machine: the obedient child must have time to die of SIGINT)
        children.stop(int_grace=3.0, term_grace=1.0)
        took = time.monotonic() - t0
        assert a.returncode == -signal.SIGINT and b.returncode == -signal.SIGKILL, (a.returncode, b.returncode)
        assert 4.0 <= took < 10.0, took    # the stubborn one needed both graces, then SIGKILL
        assert children.poll() == [("obedient", -signal.SIGINT), ("stubborn", -signal.SIGKILL)]
        assert bystander.poll() is None, "a process the set did not start was touched"
    finally:
        bystander.kill()
        bystander.wait()
        children.stop()


def test_children_run_in_their_own_session_with_the_parent_registered():
    children = ChildProcesses()
    try:
        p = children.start("env", [*PY, f"import os; print(os.getsid(0), os.environ['{PARENT_ENV}'], flush=True)"],
                           stdout=subprocess.PIPE)
        sid, parent = _read_line(p).split()
        assert int(sid) == p.pid and int(parent) == os.getpid()
        assert child_env({})[PARENT_ENV] == str(os.getpid())
    finally:
        children.stop()


# A launcher (first process) that starts a child calling die_with_parent, prints the child's pid,
# then sleeps until killed. The child optionally runs without prctl (the watch-thread fallback),
# and arms itself only after `arm_delay` s (so the launcher can die before it arms; importing the
# package would arm it at once, which test_importing_the_package_arms_a_child checks).
_LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    from edge_vlm_ros.processes import ChildProcesses
    child = '''
    import os, sys, time
    held = os.environ.pop("EDGE_VLM_PARENT_PID")   # so that importing the package does not arm it yet
    import edge_vlm_ros.processes as P
    time.sleep(float(sys.argv[2]))
    os.environ[P.PARENT_ENV] = held
    P.die_with_parent(use_prctl=sys.argv[1] == "prctl")
    assert P.PARENT_ENV not in os.environ
    time.sleep(60)
    '''
    c = ChildProcesses().start("child", [sys.executable, "-c", child, sys.argv[1], sys.argv[2]])
    print(c.pid, flush=True)
    time.sleep(float(sys.argv[3]))
""")


@pytest.mark.parametrize("mode", ["prctl", "no-prctl"])
def test_child_ends_when_its_launcher_is_sigkilled(mode):
    launcher = subprocess.Popen([*PY, _LAUNCHER, mode, "0", "60"], stdout=subprocess.PIPE, start_new_session=True)
    try:
        child = int(_read_line(launcher))
        time.sleep(2.0)                          # the child has armed itself (it imports only the stdlib)
        assert _alive(child)
        launcher.kill()
        launcher.wait()
        took = _wait_gone(child, 5.0)
        assert took is not None, f"child {child} ({mode}) outlived its SIGKILLed launcher"
        # the kernel's signal is immediate; the watch thread polls every 0.5 s
        assert took < (1.0 if mode == "prctl" else 2.0), took
    finally:
        launcher.kill()
        launcher.wait()


def test_child_whose_launcher_died_before_it_armed_stops_at_once():
    # the launcher exits right after starting the child; the child arms itself 1.5 s later
    launcher = subprocess.Popen([*PY, _LAUNCHER, "prctl", "1.5", "0"], stdout=subprocess.PIPE, start_new_session=True)
    child = int(_read_line(launcher))
    assert launcher.wait(30) == 0
    took = _wait_gone(child, 10.0)
    assert took is not None, f"orphaned child {child} kept running"


_STOPPABLE = textwrap.dedent("""
    import sys, time
    from edge_vlm_ros.processes import ChildProcesses, launcher_main

    @launcher_main
    def main():
        children = ChildProcesses()
        try:
            c = children.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
            print(c.pid, flush=True)
            time.sleep(60)
            return 0
        finally:
            children.stop()

    sys.exit(main())
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_launcher_main_stops_its_children_and_exits_128_plus_signal(sig):
    launcher = subprocess.Popen([*PY, _STOPPABLE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    try:
        child = int(_read_line(launcher))
        launcher.send_signal(sig)
        assert launcher.wait(20) == 128 + sig
        assert not _alive(child)
        assert f"stopped by {signal.Signals(sig).name}" in launcher.stderr.read().decode()
    finally:
        launcher.kill()
        launcher.wait()


def test_importing_the_package_arms_a_child():
    """A node's launcher may die while the node still imports torch: the package's first import
    arms the parent-death signal, so the child ends then, not once its imports are done."""
    code = "import time\nimport edge_vlm_ros\ntime.sleep(60)\n"
    launcher = subprocess.Popen([*PY, "import subprocess, sys, time\nfrom edge_vlm_ros.processes import ChildProcesses\n"
                                 f"c = ChildProcesses().start('c', [sys.executable, '-c', {code!r}])\n"
                                 "print(c.pid, flush=True)\ntime.sleep(60)\n"],
                                stdout=subprocess.PIPE, start_new_session=True)
    try:
        child = int(_read_line(launcher))
        time.sleep(2.0)
        assert _alive(child)
        launcher.kill()
        launcher.wait()
        assert _wait_gone(child, 5.0) is not None, "the child outlived its launcher"
    finally:
        launcher.kill()
        launcher.wait()


def test_a_child_behind_a_forking_wrapper_lives_with_its_launcher_and_dies_with_it():
    """`sh -c 'python ...; true'` forks: the launcher is the child's grandparent. The child must not
    take that for a dead launcher, and must still stop when the launcher dies (watch thread)."""
    code = "import time\nimport edge_vlm_ros\ntime.sleep(60)\n"
    launcher = subprocess.Popen([*PY, "import shlex, subprocess, sys, time\n"
                                 "from edge_vlm_ros.processes import ChildProcesses\n"
                                 f"cmd = shlex.join([sys.executable, '-c', {code!r}]) + '; true'\n"
                                 "w = ChildProcesses().start('wrapper', ['sh', '-c', cmd])\n"
                                 "print(w.pid, flush=True)\ntime.sleep(60)\n"],
                                stdout=subprocess.PIPE, start_new_session=True)
    try:
        wrapper = int(_read_line(launcher))
        deadline = time.monotonic() + 30
        kids: list[int] = []
        while not kids and time.monotonic() < deadline:
            try:
                kids = [int(x) for x in open(f"/proc/{wrapper}/task/{wrapper}/children").read().split()]
            except FileNotFoundError:
                pass
            time.sleep(0.1)
        assert kids, "the wrapper started no child"
        child = kids[0]
        time.sleep(3.0)                       # imported and armed by now
        assert _alive(child), "the child took its grandparent launcher for a dead one"
        launcher.kill()
        launcher.wait()
        assert _wait_gone(child, 5.0) is not None, "the child outlived its launcher"
    finally:
        launcher.kill()
        launcher.wait()


# A node-like process: NodeStop installed, "spinning", then its main thread either blocks in one C
# call that never returns (os.read of a pipe nobody writes: the Python handler runs on EINTR, sets
# `requested` and os.read goes back to waiting) or keeps checking `requested` like run_node.
_NODE = textwrap.dedent("""
    import os, sys
    from edge_vlm_ros.processes import NodeStop
    stop = NodeStop(deadline_s=float(sys.argv[2]))
    stop.install()
    stop.started = stop.spinning = sys.argv[1] != "importing"
    print("up", flush=True)
    if sys.argv[1] == "importing":   # run_node has not begun: a long import, here a sleep
        import time
        time.sleep(60)
    if sys.argv[1] == "stuck":
        r, w = os.pipe()
        os.read(r, 1)              # the cleanup never gets here
    else:
        while not stop.requested.wait(0.1):
            pass
    os._exit(0)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_node_stuck_in_a_c_call_is_gone_at_its_stop_deadline_with_every_stack_on_stderr(sig):
    p = subprocess.Popen([*PY, _NODE, "stuck", "1.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _read_line(p) == "up"
        t0 = time.monotonic()
        p.send_signal(sig)
        rc = p.wait(10)
        took = time.monotonic() - t0
        err = p.stderr.read().decode()
        assert rc == 1, (rc, err)
        assert 0.9 < took < 4.0, took    # the deadline, not launch's SIGTERM 5 s later
        # every thread's stack: the main thread where it hung (line 10: os.read), the watcher
        assert err.startswith("Timeout") and 'File "<string>", line 13 in <module>' in err, err
        assert err.count("Thread 0x") == 2 and "in _watch" in err, err
    finally:
        p.kill()
        p.wait()


def test_node_that_stops_in_time_exits_cleanly_before_its_deadline():
    p = subprocess.Popen([*PY, _NODE, "spin", "1.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _read_line(p) == "up"
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0, p.stderr.read().decode()
        assert p.stderr.read() == b""
    finally:
        p.kill()
        p.wait()


def test_is_node_process_knows_the_node_entry_points():
    from edge_vlm_ros.processes import is_node_process

    assert is_node_process(["python", "-m", "edge_vlm_ros.edge_node", "--ros-args", "-r", "__ns:=/robot_0"])
    assert is_node_process(["python", "-X", "faulthandler", "-m", "edge_vlm_ros.server_node"])
    assert is_node_process(["python3", "/ws/install/edge_vlm_ros/lib/edge_vlm_ros/controller_node", "--ros-args"])
    for argv in (["python", "-m", "edge_vlm_ros.bringup"], ["python", "-m", "pytest"], ["python", "-c", "x_node"],
                 ["python", "/usr/bin/other_node"], ["python"], ["python", "-m", "other.edge_node"]):
        assert not is_node_process(argv), argv


def test_a_stop_signal_while_a_node_still_imports_ends_it_at_once_with_0():
    p = subprocess.Popen([*PY, _NODE, "importing", "3.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _read_line(p) == "up"
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
        assert time.monotonic() - t0 < 1.0
        assert p.stderr.read() == b""      # no KeyboardInterrupt traceback
    finally:
        p.kill()
        p.wait()
