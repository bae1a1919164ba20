"""The edge and server nodes as managed (lifecycle) nodes, driven through their real lifecycle
services (`<node>/change_state`, `<node>/get_state`, lifecycle_msgs) the way `ros2 lifecycle set` or a
fleet manager drives them: real processes, real DDS, a private domain.

Started with autostart false, the nodes wait unconfigured; configure and activate bring them to
serving; a request in flight when a node is deactivated still gets its one outcome; a deactivated
server refuses new requests; cleanup returns to unconfigured; a transition asked in the wrong state
is refused by the state machine; a configure that fails (a model_path that does not exist) leaves
the node unconfigured with the reason logged, and configure succeeds once the parameter is fixed.
"""

import os
import signal
import time

import numpy as np
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters

from edge_vlm_ros.bringup import NodeSet, build_specs
from edge_vlm_ros.client import RobotClient
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.tools.default_model import ensure
from ros_harness import assert_one_outcome_each

SERVICE_S = 240.0      # a configure loads a model: generous on a loaded 2-core machine
ANSWER_S = 120.0
EDGE, SERVER = "/robot_0/edge_vlm_edge", "/edge_vlm_server"
LABEL = {State.PRIMARY_STATE_UNCONFIGURED: "unconfigured", State.PRIMARY_STATE_INACTIVE: "inactive",
         State.PRIMARY_STATE_ACTIVE: "active", State.PRIMARY_STATE_FINALIZED: "finalized"}


class Lifecycle:
    """Clients of one node's lifecycle and parameter services, on the test client's node."""

    def __init__(self, client: RobotClient, node: str) -> None:
        self.name = node
        self._change = client.node.create_client(ChangeState, f"{node}/change_state")
        self._get = client.node.create_client(GetState, f"{node}/get_state")
        self._set = client.node.create_client(SetParameters, f"{node}/set_parameters")
        for c in (self._change, self._get, self._set):
            assert c.wait_for_service(timeout_sec=SERVICE_S), f"{node}: no service {c.srv_name}"

    @staticmethod
    def _call(client, request, timeout=SERVICE_S):
        future = client.call_async(request)      # answered on the test client's spin thread
        deadline = time.monotonic() + timeout
        while not future.done():
            assert time.monotonic() < deadline, f"no reply from {client.srv_name} within {timeout} s"
            time.sleep(0.02)
        return future.result()

    def state(self) -> int:
        return self._call(self._get, GetState.Request()).current_state.id

    def change(self, transition: int) -> bool:
        req = ChangeState.Request()
        req.transition = Transition(id=transition)
        return self._call(self._change, req).success

    def change_async(self, transition: int):
        req = ChangeState.Request()
        req.transition = Transition(id=transition)
        return self._change.call_async(req)

    def set_string(self, name: str, value: str) -> None:
        p = Parameter(name=name, value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value))
        res = self._call(self._set, SetParameters.Request(parameters=[p]))
        assert all(r.successful for r in res.results), res

    def expect(self, state: int) -> None:
        got = self.state()
        assert got == state, f"{self.name}: {LABEL.get(got, got)}, expected {LABEL[state]}"


def _start(ros_env, tmp_path, overrides):
    keys_dir = tmp_path / "keys"
    specs = build_specs(1, overrides, with_controller=False, keys_dir=keys_dir)
    nodes = NodeSet(specs, env=ros_env, log_dir=tmp_path / "logs").start()
    client = RobotClient(["robot_0"], f"test_lifecycle_{os.getpid()}", auth_keys_dir=str(keys_dir))
    return nodes, client


def _log(tmp_path, name: str) -> str:
    return (tmp_path / "logs" / f"{name}.log").read_text()


def _ask(client, text: str) -> tuple[int, int]:
    """Send a frame and a prompt; (answers so far, prompts the edge announced so far) before it."""
    with client._lock:
        before = (len(client.answers["robot_0"]), len(client.sent["robot_0"]))
    client.send_image("robot_0", np.full((32, 32, 3), 90, np.uint8))
    time.sleep(0.05)     # the frame first: the edge answers a prompt on its newest frame
    client.send_prompt("robot_0", text)
    return before


def _outcome_of(client, request_id: str, timeout: float = ANSWER_S):
    def got():
        return [a for _, a in client.answers["robot_0"] if a.request_id == request_id]
    assert client.wait_for(lambda: bool(got()), timeout), f"no outcome for {request_id} within {timeout} s"
    return got()[0]


def _announced(client, n_before: int, timeout: float = ANSWER_S) -> str:
    """The id of the next request the edge announces (its Prompt seen on the wire)."""
    assert client.wait_for(lambda: len(client.sent["robot_0"]) > n_before, timeout), "the edge announced nothing"
    return client.sent["robot_0"][n_before]


def test_configure_activate_deactivate_cleanup_with_requests_in_flight(ros_env, tmp_path):
    overrides = {"edge": {"autostart": False, "max_new_tokens": 24, "request_timeout_s": 60.0},
                 "server": {"autostart": False, "ignore_eos": True}}
    nodes, client = _start(ros_env, tmp_path, overrides)
    try:
        edge, server = Lifecycle(client, EDGE), Lifecycle(client, SERVER)
        edge.expect(State.PRIMARY_STATE_UNCONFIGURED)
        server.expect(State.PRIMARY_STATE_UNCONFIGURED)
        # wrong state: refused by the state machine, nothing changes
        assert not edge.change(Transition.TRANSITION_ACTIVATE)
        assert not server.change(Transition.TRANSITION_DEACTIVATE)
        assert not server.change(Transition.TRANSITION_CLEANUP)
        edge.expect(State.PRIMARY_STATE_UNCONFIGURED)
        server.expect(State.PRIMARY_STATE_UNCONFIGURED)

        for lc in (server, edge):
            assert lc.change(Transition.TRANSITION_CONFIGURE), _log(tmp_path, "server")[-3000:]
            lc.expect(State.PRIMARY_STATE_INACTIVE)
            assert not lc.change(Transition.TRANSITION_CONFIGURE)      # configured already
            assert lc.change(Transition.TRANSITION_ACTIVATE)
            lc.expect(State.PRIMARY_STATE_ACTIVE)
        assert client.wait_ready(ANSWER_S, abort=lambda: bool(nodes.poll()), probe=True), nodes.poll()

        # 1. the edge is deactivated while its request is in flight: the server's answer still closes it
        _, n_sent = _ask(client, "what is in front of the robot?")
        rid = _announced(client, n_sent)
        assert edge.change(Transition.TRANSITION_DEACTIVATE)
        edge.expect(State.PRIMARY_STATE_INACTIVE)
        first = _outcome_of(client, rid)
        assert first.outcome is Outcome.OK, first
        # an inactive edge takes no new request: it answers REJECTED itself and sends nothing
        n_answers, n_sent = _ask(client, "anyone there?")
        assert client.wait_for(lambda: len(client.answers["robot_0"]) > n_answers, ANSWER_S)
        refused = client.answers["robot_0"][n_answers][1]
        assert refused.outcome is Outcome.REJECTED and "inactive" in refused.reason, refused
        assert len(client.sent["robot_0"]) == n_sent, "an inactive edge announced a request"
        assert edge.change(Transition.TRANSITION_ACTIVATE)

        # 2. the server is deactivated while a request is in flight: it gets exactly one outcome
        # (answered when the server had taken its prompt, else refused)
        _, n_sent = _ask(client, "what color is the shape?")
        rid = _announced(client, n_sent)
        assert server.change(Transition.TRANSITION_DEACTIVATE)
        server.expect(State.PRIMARY_STATE_INACTIVE)
        second = _outcome_of(client, rid)
        assert second.outcome in (Outcome.OK, Outcome.REJECTED), second
        # a new request to the inactive server is refused at once
        _, n_sent = _ask(client, "and now?")
        third = _outcome_of(client, _announced(client, n_sent))
        assert third.outcome is Outcome.REJECTED and "inactive" in third.reason, third
        # activated again, it serves again
        assert server.change(Transition.TRANSITION_ACTIVATE)
        _, n_sent = _ask(client, "back again?")
        fourth = _outcome_of(client, _announced(client, n_sent))
        assert fourth.outcome is Outcome.OK, fourth
        print(f"in flight at the server's deactivate: {second.outcome.name} ({second.reason or 'answered'})")

        # exactly one outcome per announced request, including the edge's deadline tracker: give a
        # second outcome time to show up (the edge's deadline is 60 s away; the server's answers are not)
        time.sleep(2.0)
        assert_one_outcome_each(client, {"robot_0": [*client.sent["robot_0"], refused.request_id]})

        # 3. deactivate + cleanup: back to unconfigured, and configurable again
        for lc in (edge, server):
            assert lc.change(Transition.TRANSITION_DEACTIVATE)
            assert lc.change(Transition.TRANSITION_CLEANUP)
            lc.expect(State.PRIMARY_STATE_UNCONFIGURED)
            assert not lc.change(Transition.TRANSITION_DEACTIVATE)
        assert server.change(Transition.TRANSITION_CONFIGURE)
        server.expect(State.PRIMARY_STATE_INACTIVE)

        # 4. shutdown ends the process cleanly (from inactive, and from unconfigured)
        procs = {spec.name: p for spec, p in nodes.procs}
        assert server.change(Transition.TRANSITION_INACTIVE_SHUTDOWN)
        assert edge.change(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
        for name in ("server", "edge_robot_0"):
            assert procs[name].wait(30) == 0, _log(tmp_path, name)[-3000:]
        for name in ("server", "edge_robot_0"):
            text = _log(tmp_path, name)
            assert "Traceback" not in text, text[-3000:]
    finally:
        client.close()
        nodes.stop()


def test_failed_configure_leaves_the_node_unconfigured_until_the_parameter_is_fixed(ros_env, tmp_path):
    missing = str(tmp_path / "no_such_model")
    overrides = {"edge": {"autostart": False, "model_path": missing},
                 "server": {"autostart": False, "model_path": missing}}
    nodes, client = _start(ros_env, tmp_path, overrides)
    try:
        for node, log in ((SERVER, "server"), (EDGE, "edge_robot_0")):
            lc = Lifecycle(client, node)
            assert not lc.change(Transition.TRANSITION_CONFIGURE)
            lc.expect(State.PRIMARY_STATE_UNCONFIGURED)
            text = _log(tmp_path, log)
            assert "configure failed" in text and "no such folder" in text and "no_such_model" in text, text[-3000:]
            assert not lc.change(Transition.TRANSITION_ACTIVATE)   # still nothing to activate
            lc.set_string("model_path", ensure())
            assert lc.change(Transition.TRANSITION_CONFIGURE), _log(tmp_path, log)[-3000:]
            assert lc.change(Transition.TRANSITION_ACTIVATE)
            lc.expect(State.PRIMARY_STATE_ACTIVE)
        assert client.wait_ready(ANSWER_S, abort=lambda: bool(nodes.poll()), probe=True), nodes.poll()
        assert not nodes.poll(), nodes.poll()
        # a node that was never configured stops on SIGINT like any other
        procs = {spec.name: p for spec, p in nodes.procs}
        t0 = time.monotonic()
        procs["server"].send_signal(signal.SIGINT)
        assert procs["server"].wait(10) == 0
        assert time.monotonic() - t0 < 2.0, f"{time.monotonic() - t0:.2f} s from SIGINT to exit"
    finally:
        client.close()
        nodes.stop()


def test_a_failed_autostart_ends_the_process_with_exit_code_1(ros_env, tmp_path):
    # autostart (the default): a node that cannot configure ends, as a node that could not start
    # always did, so bringup and `ros2 launch` see it exit instead of waiting on it
    specs = build_specs(1, {"server": {"model_path": str(tmp_path / "no_such_model")}}, with_controller=False,
                        keys_dir=tmp_path / "keys")
    nodes = NodeSet([s for s in specs if s.role == "server"], env=ros_env, log_dir=tmp_path / "logs").start()
    try:
        (_, p), = nodes.procs
        assert p.wait(SERVICE_S) == 1, _log(tmp_path, "server")[-3000:]
        text = _log(tmp_path, "server")
        assert "configure failed" in text and "no such folder" in text and "autostart failed" in text, text[-3000:]
    finally:
        nodes.stop()


def test_sigint_while_a_requested_configure_loads_the_model_exits_0_within_2s(ros_env, tmp_path):
    # configure asked over the service runs inside the spin loop; a stop signal must not wait for it
    nodes, client = _start(ros_env, tmp_path, {"server": {"autostart": False}, "edge": {"autostart": False}})
    try:
        server = Lifecycle(client, SERVER)
        server.change_async(Transition.TRANSITION_CONFIGURE)
        deadline = time.monotonic() + SERVICE_S
        while "loading" not in _log(tmp_path, "server"):     # configure has begun: the model is loading
            assert time.monotonic() < deadline, _log(tmp_path, "server")[-3000:]
            time.sleep(0.02)
        p = {spec.name: p for spec, p in nodes.procs}["server"]
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        rc = p.wait(10)
        took = time.monotonic() - t0
        text = _log(tmp_path, "server")
        assert rc == 0 and took < 2.0, f"exit {rc} after {took:.2f} s\n{text[-3000:]}"
        assert "configured (inactive)" not in text, text[-3000:]      # it really was cut short
        print(f"SIGINT during a requested configure -> exit 0 in {took:.2f} s")
    finally:
        client.close()
        nodes.stop()
