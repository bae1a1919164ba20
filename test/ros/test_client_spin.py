"""RobotClient's spin thread survives entities made beside it.

rclpy's ActionClient adds itself to its node before its constructor has set its lock, so a client
made while another thread spins that node can be polled half-built: the executor raised
"'ActionClient' object has no attribute '_lock'", then "Attempt to replace existing callback" on
every later spin, and the RobotClient heard nothing more (a CI run of test_lifecycle_cleanup lost its
Ask goal that way). RobotClient makes its Ask clients with the spin thread held between two
spin_once calls (RobotClient._quiesced). This test widens the window (20 ms between registering
and the rest of the constructor, as a preempted thread on a loaded machine has), makes many clients
from two threads while the client spins, and checks it keeps spinning and hearing (without the gate:
16-18 spin errors here), and that the closed gate delivers nothing.
"""

import threading
import time

import rclpy
from rclpy.action import ActionClient
from rclpy.node import Node

from edge_vlm_ros import qos, topics
from edge_vlm_ros.action import Ask
from edge_vlm_ros.client import RobotClient
from edge_vlm_ros.core.auth import ensure_keys
from edge_vlm_ros.msg import Answer

N_MAKERS, PER_MAKER = 2, 10


def test_ask_clients_made_while_spinning_leave_the_spin_thread_alive_and_hearing(ros_env, tmp_path):
    ensure_keys(tmp_path, ["robot_0"])
    client = RobotClient(["robot_0"], "test_client_spin", auth_keys_dir=str(tmp_path))
    ctx = noise = None
    try:
        time.sleep(1.0)                 # the client idle: its spin thread waits in spin_once

        # Widen the window as a loaded machine does: rclpy's ActionClient registers itself with the
        # node (which wakes the node's executor) before it sets its lock; here 20 ms pass in between.
        real_add_waitable = client.node.add_waitable

        def slow_add_waitable(waitable):
            real_add_waitable(waitable)
            if threading.current_thread().name.startswith("maker"):
                time.sleep(0.02)

        client.node.add_waitable = slow_add_waitable
        made: list[ActionClient] = []

        def make(k: int) -> None:
            for i in range(PER_MAKER):
                with client._quiesced():                    # the gate itself
                    made.append(ActionClient(client.node, Ask, f"/robot_{k}_{i}/edge_vlm/ask"))
            client._ask_client(f"robot_{k}")                # as ask_with_action does

        makers = [threading.Thread(target=make, args=(k,), name=f"maker_{k}") for k in range(N_MAKERS)]
        for t in makers:
            t.start()
        for t in makers:
            t.join(120)
        client.node.add_waitable = real_add_waitable
        time.sleep(0.3)
        assert client._spin.is_alive() and client.spin_errors == 0, client.spin_errors
        assert len(made) == N_MAKERS * PER_MAKER and len(client._ask_clients) == N_MAKERS
        assert client._ask_client("robot_1") is client._ask_clients["robot_1"]     # made once

        # ... and it still hears the domain (unsigned answers: received, counted, dropped)
        ctx = rclpy.Context()
        rclpy.init(context=ctx)
        noise = Node("noise", context=ctx)
        pub = noise.create_publisher(Answer, topics.for_robot("robot_0", topics.ANSWER), qos.ANSWER)
        assert client.wait_for(lambda: pub.get_subscription_count() >= 1, 30)
        m = Answer()
        m.request_id, m.robot_id = "0" * 32, "robot_0"
        for _ in range(5):
            pub.publish(m)
        heard = lambda: client.auth_dropped.get("robot_0", {}).get("unsigned", 0)   # noqa: E731
        assert client.wait_for(lambda: heard() >= 5, 30), client.spin_errors

        # The gate holds the spin thread: nothing is delivered while it is closed, all of it after.
        before = heard()
        with client._quiesced():
            for _ in range(5):
                pub.publish(m)
            time.sleep(0.5)
            assert heard() == before, "the spin thread ran while the gate was closed"
        assert client.wait_for(lambda: heard() >= before + 5, 30)
    finally:
        if noise is not None:
            noise.destroy_node()
            ctx.try_shutdown()
        client.close()
