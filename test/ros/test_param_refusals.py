"""Refused parameter sets show on /diagnostics: on running edge and server processes, a read-only
parameter set and an invalid live value are refused over the real set_parameters service, and the
node's DiagnosticStatus counts them (param_sets_refused, param_refusals by kind, last_param_refusal)
while its level is unchanged and it keeps serving."""

import threading

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray

from edge_vlm_ros import qos, topics
from edge_vlm_ros.core.types import Outcome
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava

from ros_harness import running
from test_live_params import EDGE, SERVER, Params

RGB = np.random.RandomState(5).randint(0, 256, (32, 32, 3), np.uint8)


class Statuses:
    """The newest DiagnosticStatus of each name heard on /diagnostics."""

    def __init__(self, node) -> None:
        self.latest: dict[str, dict] = {}
        self.cond = threading.Condition()
        node.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, self._on, qos.DIAGNOSTICS)

    def _on(self, msg: DiagnosticArray) -> None:
        with self.cond:
            for s in msg.status:
                self.latest[s.name] = {"level": s.level[0] if isinstance(s.level, bytes) else int(s.level),
                                       "message": s.message, **{kv.key: kv.value for kv in s.values}}
            self.cond.notify_all()

    def wait(self, prefix: str, pred, timeout: float = 60.0) -> dict:
        def found():
            return next((v for k, v in self.latest.items() if k.startswith(prefix) and pred(v)), None)
        with self.cond:
            assert self.cond.wait_for(lambda: found() is not None, timeout), (prefix, self.latest)
            return found()


def test_refused_parameter_sets_are_counted_on_diagnostics(ros_env, tmp_path):
    model = build_tiny_llava(tmp_path / "llava")
    overrides = {"edge": {"model_path": str(model), "codec_dtype": "float32", "max_new_tokens": 4},
                 "server": {"model_path": str(model), "ignore_eos": True}}
    with running(ros_env, tmp_path, 1, overrides) as (_, client):
        diag = Statuses(client.node)
        edge_name, server_name = "edge_vlm_ros: edge (robot_0)", "edge_vlm_ros: server"
        before = diag.wait(edge_name, lambda v: "param_sets_refused" in v)
        assert before["param_sets_refused"] == "0" and before["last_param_refusal"] == "-", before
        edge, server = Params(client.node, EDGE), Params(client.node, SERVER)

        ok, reason = edge.set("robot_id", "robot_9")                    # read-only
        assert not ok and "read-only" in reason, reason
        ok, reason = edge.set("jpeg_quality", 500)                      # live, but invalid
        assert not ok and "jpeg_quality=500" in reason, reason
        after = diag.wait(edge_name, lambda v: v.get("param_sets_refused") == "2")
        assert after["param_refusals"] == "invalid=1, read_only=1", after
        assert "jpeg_quality=500" in after["last_param_refusal"], after
        assert after["level"] == 0, (before, after)          # a refusal changes nothing

        ok, reason = server.set("model_path", "/elsewhere")
        assert not ok and "read-only" in reason, reason
        s = diag.wait(server_name, lambda v: v.get("param_sets_refused") == "1")
        assert s["param_refusals"] == "read_only=1" and "model_path" in s["last_param_refusal"], s

        # and both still serve with their previous configuration
        a = client.ask("robot_0", RGB, "what is it ?", timeout=90)
        assert a is not None and a.outcome is Outcome.OK, a
