"""SROS2 (DDS-Security) for the package's node set: an access-control policy and the keystore commands.

Message authentication (HMAC per robot) works on every middleware; SROS2 adds what only the DDS
security plugins can do: encrypted traffic and access control enforced by the middleware, so a
robot's process cannot even open a writer on another robot's topics. Each security identity is an
*enclave*:

- `/edge_vlm/<robot>`: everything that runs on robot <robot> in its namespace: the edge node, the
  LIBERO bridge or the real robot's drivers (camera, joint state), and a `RobotClient([robot])`.
  It may publish only its own requests (`/<robot>/edge_vlm/prompt`, `/<robot>/edge_vlm/features`,
  `/<robot>/edge_vlm/cancel`), its own local-failure answers/action chunks and its own sensor
  topics, and read only its own answers, flow control, action chunks and actions. The edge serves
  the robot's Ask action (`/<robot>/edge_vlm/ask`: sros2 "execute", i.e. its send_goal, cancel_goal
  and get_result services and its feedback and status topics); the client calls it. Nothing of
  another robot.
- `/edge_vlm/server`: reads every listed robot's prompts, features and cancels, publishes their
  answers, flow control and action chunks.
- `/edge_vlm/controller`: reads answers, action chunks, episodes and robot state, publishes
  actions and instructions (`prompt_text`).
- `/edge_vlm/replay` (with --replay): the rosbag replay node, publishing camera frames and prompt
  text into the robots' namespaces and reading their flow control.

Every node also gets ROS's own infrastructure: /rosout, /parameter_events, /clock and its own
parameter (and, Iron and later, type description) services; every node of the package but the client
publishes its health on /diagnostics.

    python -m edge_vlm_ros.tools.sros2 policy --robots robot_0 robot_1 --out policy.xml
    python -m edge_vlm_ros.tools.sros2 setup --keystore ~/edge_vlm_keystore --robots robot_0 robot_1

`setup` writes the policy and a shell script of the exact `ros2 security` commands into the
keystore folder, and runs them when `ros2` with the sros2 verbs is on PATH (a real ROS 2 install);
otherwise it says so and leaves the script to run where ROS 2 is. The governance file is sros2's
default (join access control, discovery and data encrypted, every topic access-controlled).
Governance and permissions carry the DDS domain id: create them for the domain the nodes run in.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_vlm_ros import topics
from edge_vlm_ros.core.config import check_robot_name

POLICY_VERSION = "0.2.0"          # the sros2 policy format this writes (policy.xsd's fixed version)
ENCLAVE_ROOT = "/edge_vlm"
POLICY_FILE = "edge_vlm_policy.xml"
SCRIPT_FILE = "edge_vlm_sros2_setup.sh"

# Node names (as in each node's super().__init__) and where the launch files put them.
EDGE_NODE = "edge_vlm_edge"
BRIDGE_NODE = "edge_vlm_libero_bridge"
CLIENT_NODE = "edge_vlm_client"
SERVER_NODE = "edge_vlm_server"
CONTROLLER_NODE = "edge_vlm_controller"
REPLAY_NODE = "edge_vlm_replay"

# Services every rclpy node serves: parameters (all distros) and type descriptions (Iron and later).
NODE_SERVICES = ("~/describe_parameters", "~/get_parameter_types", "~/get_parameters", "~/list_parameters",
                 "~/set_parameters", "~/set_parameters_atomically", "~/get_type_description")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Profile:
    """What one node may do, with fully qualified topic names (services relative to the node: ~/)."""

    node: str
    ns: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    reply: tuple[str, ...] = NODE_SERVICES
    execute: tuple[str, ...] = ()    # actions it serves (sros2 grants their services and topics)
    call: tuple[str, ...] = ()       # actions it calls


@dataclass(frozen=True)
class Enclave:
    path: str
    profiles: tuple[Profile, ...]

    def grants(self, kind: str) -> set[str]:
        """Fully qualified names this enclave may `kind` (publish | subscribe | reply | execute | call);
        ~/ resolved."""
        out: set[str] = set()
        for p in self.profiles:
            for name in getattr(p, kind):
                out.add(resolve(name, p.ns, p.node))
        return out


def resolve(name: str, ns: str, node: str) -> str:
    """The sros2 rules for a name in a profile: absolute stays, ~/x is <ns>/<node>/x, x is <ns>/x."""
    if name.startswith("/"):
        return name
    prefix = ns if ns.endswith("/") else ns + "/"
    if name.startswith("~/"):
        return f"{prefix}{node}/{name[2:]}"
    return prefix + name


def check_robot(robot: str) -> str:
    return check_robot_name(robot)


def enclave_path(role: str, root: str = ENCLAVE_ROOT) -> str:
    """Enclave of a robot (role = its name), 'server', 'controller' or 'replay'."""
    return f"{root.rstrip('/')}/{role}"


def _infra(publish: list[str], subscribe: list[str],
           diagnostics: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Adds ROS's own topics: logging, parameter events, simulated time, and /diagnostics (every
    node of the package reports its health there)."""
    return (tuple(publish + ["/rosout", "/parameter_events"] + ([topics.DIAGNOSTICS] if diagnostics else [])),
            tuple(subscribe + ["/parameter_events", "/clock"]))


def robot_enclave(robot: str, root: str = ENCLAVE_ROOT) -> Enclave:
    r = check_robot(robot)
    ns = f"/{r}"

    def t(name: str) -> str:
        return topics.for_robot(r, name)

    # Edge node: requests and cancels out, every outcome out (the only publisher of answers and chunks
    # on the robot), sensors (raw or compressed camera), flow, the server's outcomes, its own outcomes
    # heard back and cancels in; it serves the Ask action.
    edge = Profile(EDGE_NODE, ns, *_infra(
        [t(topics.PROMPT), t(topics.FEATURES), t(topics.CANCEL), t(topics.ANSWER), t(topics.ACTION_CHUNK),
         t(topics.CODEC_SWITCH)],
        [t(topics.CAMERA), t(topics.CAMERA_COMPRESSED), t(topics.PROMPT_TEXT), t(topics.FLOW), t(topics.ROBOT_STATE),
         t(topics.EPISODE), t(topics.SERVER_ANSWER), t(topics.SERVER_ACTION_CHUNK), t(topics.ANSWER),
         t(topics.ACTION_CHUNK), t(topics.CANCEL)]),
        execute=(t(topics.ASK),))
    # The LIBERO bridge, or on a real robot its drivers: sensors and episodes out, executed actions in.
    bridge = Profile(BRIDGE_NODE, ns, *_infra(
        [t(topics.CAMERA), t(topics.WRIST_CAMERA), t(topics.ROBOT_STATE), t(topics.EPISODE)],
        [t(topics.ACTION)]))
    # A RobotClient([robot]) on the robot: frames and prompts in, this robot's outcomes back.
    client = Profile(CLIENT_NODE, "/", *_infra(
        [t(topics.CAMERA), t(topics.PROMPT_TEXT), t(topics.ROBOT_STATE)],
        [t(topics.ANSWER), t(topics.FLOW), t(topics.PROMPT), t(topics.ACTION_CHUNK), t(topics.ACTION),
         t(topics.EPISODE)], diagnostics=False), call=(t(topics.ASK),))
    return Enclave(enclave_path(r, root), (edge, bridge, client))


def server_enclave(robots: list[str], root: str = ENCLAVE_ROOT) -> Enclave:
    pub = [topics.for_robot(check_robot(r), n) for r in robots for n in (topics.SERVER_ANSWER, topics.FLOW,
                                                                          topics.SERVER_ACTION_CHUNK)]
    sub = [topics.for_robot(r, n) for r in robots for n in (topics.PROMPT, topics.FEATURES, topics.CANCEL)]
    return Enclave(enclave_path("server", root), (Profile(SERVER_NODE, "/", *_infra(pub, sub)),))


def controller_enclave(robots: list[str], root: str = ENCLAVE_ROOT) -> Enclave:
    pub = [topics.for_robot(check_robot(r), n) for r in robots for n in (topics.ACTION, topics.PROMPT_TEXT)]
    sub = [topics.for_robot(r, n) for r in robots for n in (topics.ANSWER, topics.ACTION_CHUNK, topics.EPISODE,
                                                             topics.ROBOT_STATE)]
    return Enclave(enclave_path("controller", root), (Profile(CONTROLLER_NODE, "/", *_infra(pub, sub)),))


def replay_enclave(robots: list[str], root: str = ENCLAVE_ROOT) -> Enclave:
    """Default output topics only; a replay remapped elsewhere needs the policy edited."""
    pub = [topics.for_robot(check_robot(r), n) for r in robots for n in (topics.CAMERA, topics.PROMPT_TEXT)]
    sub = [topics.for_robot(r, topics.FLOW) for r in robots]
    publish, subscribe = _infra(pub + ["/clock"], sub)
    return Enclave(enclave_path("replay", root), (Profile(REPLAY_NODE, "/", publish, subscribe),))


def enclaves(robots: list[str], replay: bool = False, root: str = ENCLAVE_ROOT) -> list[Enclave]:
    if not robots:
        raise ValueError("at least one robot is needed (--robots robot_0 ...)")
    if len(set(robots)) != len(robots):
        raise ValueError(f"robot names repeat: {robots}")
    if not root.startswith("/") or not all(_NAME.match(p) for p in root.strip("/").split("/") if p):
        raise ValueError(f"enclave root {root!r} must be an absolute ROS namespace such as /edge_vlm")
    out = [robot_enclave(r, root) for r in robots]
    out += [server_enclave(robots, root), controller_enclave(robots, root)]
    if replay:
        out.append(replay_enclave(robots, root))
    return out


def policy_xml(encl: list[Enclave]) -> str:
    """The sros2 policy document (format 0.2.0) granting exactly what each enclave's profiles list."""
    policy = ET.Element("policy", version=POLICY_VERSION)
    enclaves_el = ET.SubElement(policy, "enclaves")
    for e in encl:
        profiles_el = ET.SubElement(ET.SubElement(enclaves_el, "enclave", path=e.path), "profiles")
        for p in e.profiles:
            prof = ET.SubElement(profiles_el, "profile", ns=p.ns, node=p.node)
            for attr, names, list_tag, item_tag in (("publish", p.publish, "topics", "topic"),
                                                    ("subscribe", p.subscribe, "topics", "topic"),
                                                    ("reply", p.reply, "services", "service"),
                                                    ("execute", p.execute, "actions", "action"),
                                                    ("call", p.call, "actions", "action")):
                if names:
                    group = ET.SubElement(prof, list_tag, {attr: "ALLOW"})
                    for name in sorted(set(names)):
                        ET.SubElement(group, item_tag).text = name
    ET.indent(policy, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(policy, encoding="unicode") + "\n"


# ---- keystore commands --------------------------------------------------------------------------

def action_dds_topics(action: str, kind: str) -> dict[str, set[str]]:
    """The DDS topics sros2 grants for an action it finds in a policy (its permissions template):
    `execute` (a server) or `call` (a client) -> {"publish": ..., "subscribe": ...}. Used to check the
    signed permissions; the policy itself names only the action."""
    requests = {f"rq{action}/_action/{s}Request" for s in ("send_goal", "cancel_goal", "get_result")}
    replies = {f"rr{action}/_action/{s}Reply" for s in ("send_goal", "cancel_goal", "get_result")}
    topics_ = {f"rt{action}/_action/{t}" for t in ("feedback", "status")}
    if kind == "execute":
        return {"publish": replies | topics_, "subscribe": requests}
    if kind == "call":
        return {"publish": requests, "subscribe": replies | topics_}
    raise ValueError(f"kind must be 'execute' or 'call', got {kind!r}")


def setup_commands(keystore: Path, encl: list[Enclave], policy: Path) -> list[list[str]]:
    """`ros2 security` argv lists, in order (create_keystore is skipped by the script if it exists)."""
    ks = str(keystore)
    cmds = [["ros2", "security", "create_keystore", ks]]
    for e in encl:
        cmds.append(["ros2", "security", "create_enclave", ks, e.path])
        cmds.append(["ros2", "security", "create_permission", ks, e.path, str(policy)])
    return cmds


def is_keystore(keystore: Path) -> bool:
    """What sros2 itself checks before refusing to create a keystore a second time."""
    return all((keystore / p).is_file() for p in ("public/permissions_ca.cert.pem", "public/identity_ca.cert.pem",
                                                  "private/permissions_ca.key.pem", "private/identity_ca.key.pem",
                                                  "enclaves/governance.p7s"))


def restrict_private_keys(keystore: Path) -> list[Path]:
    """chmod 600 every private key of the keystore (sros2 creates them readable by everyone)."""
    keys = [k for d in ("private", "enclaves") for k in (keystore / d).rglob("*key.pem")
            if k.is_file() and not k.is_symlink()]
    for k in keys:
        k.chmod(0o600)
    return keys


def setup_script(keystore: Path, encl: list[Enclave], policy: Path, domain_id: int) -> str:
    cmds = setup_commands(keystore, encl, policy)
    q = shlex.join
    ks = shlex.quote(str(keystore))
    lines = ["#!/usr/bin/env bash",
             "# SROS2 keystore, enclaves and permissions for edge_vlm_ros (written by",
             "# python -m edge_vlm_ros.tools.sros2 setup). Needs a sourced ROS 2 with sros2.",
             "set -euo pipefail",
             "# Governance and permissions name the DDS domain: the nodes must run in this one.",
             f"export ROS_DOMAIN_ID={domain_id}",
             f"[ -f {ks}/enclaves/governance.p7s ] || {q(cmds[0])}"]
    lines += [q(c) for c in cmds[1:]]
    lines += ["# sros2 writes private keys world-readable; only their owner should read them.",
              f"find {ks}/private {ks}/enclaves -name '*key.pem' -type f -exec chmod 600 {{}} +"]
    lines += ["echo 'Run the nodes with:'",
              f"echo '  export ROS_SECURITY_KEYSTORE='{ks}",
              "echo '  export ROS_SECURITY_ENABLE=true ROS_SECURITY_STRATEGY=Enforce'",
              f"echo '  export ROS_DOMAIN_ID={domain_id}'"]
    return "\n".join(lines) + "\n"


def sros2_available() -> bool:
    """True when `ros2 security` works here (a ROS 2 install with sros2 sourced)."""
    if shutil.which("ros2") is None:
        return False
    try:
        r = subprocess.run(["ros2", "security", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "create_permission" in r.stdout


def run_setup(keystore: Path, encl: list[Enclave], domain_id: int, execute: bool | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Writes policy and script into `keystore`; runs the commands when sros2 is available (or
    `execute` says so). Returns what was written and whether the commands ran."""
    keystore = keystore.expanduser().resolve()
    keystore.mkdir(parents=True, exist_ok=True)
    policy = keystore / POLICY_FILE
    policy.write_text(policy_xml(encl))
    script = keystore / SCRIPT_FILE
    script.write_text(setup_script(keystore, encl, policy, domain_id))
    script.chmod(0o755)
    log(f"wrote {policy} ({len(encl)} enclaves) and {script}")
    if execute is None:
        execute = sros2_available()
    if not execute:
        log("`ros2 security` (sros2) is not available here: nothing was created. Run the script on a "
            f"machine with ROS 2 and sros2 sourced: bash {script}")
        return {"policy": policy, "script": script, "ran": False}
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id))
    for argv in setup_commands(keystore, encl, policy):
        if argv[2] == "create_keystore" and is_keystore(keystore):
            log(f"keystore {keystore} exists: kept")
            continue
        log("+ " + shlex.join(argv))
        r = subprocess.run(argv, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    restrict_private_keys(keystore)
    log(f"keystore ready. Run the nodes with ROS_SECURITY_KEYSTORE={keystore} ROS_SECURITY_ENABLE=true "
        f"ROS_SECURITY_STRATEGY=Enforce ROS_DOMAIN_ID={domain_id}, each with its enclave "
        f"(the launch files' enclave arguments)")
    return {"policy": policy, "script": script, "ran": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--robots", nargs="+", required=True, help="robot names (namespaces), e.g. robot_0 robot_1")
    common.add_argument("--replay", action="store_true", help="add the rosbag replay node's enclave")
    common.add_argument("--enclave-root", default=ENCLAVE_ROOT, help="prefix of every enclave (default /edge_vlm)")
    p = sub.add_parser("policy", parents=[common], help="write the SROS2 policy XML")
    p.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    s = sub.add_parser("setup", parents=[common], help="keystore, enclaves and permissions")
    s.add_argument("--keystore", type=Path, required=True, help="keystore folder (created if missing)")
    s.add_argument("--domain-id", type=int, default=int(os.environ.get("ROS_DOMAIN_ID", "0") or 0),
                   help="DDS domain the nodes run in (default: $ROS_DOMAIN_ID or 0)")
    s.add_argument("--script-only", action="store_true", help="write policy and script, run nothing")
    args = ap.parse_args(argv)
    try:
        encl = enclaves(args.robots, args.replay, args.enclave_root)
        if args.cmd == "policy":
            text = policy_xml(encl)
            if args.out is None:
                sys.stdout.write(text)
            else:
                args.out.write_text(text)
                print(f"wrote {args.out}: enclaves {', '.join(e.path for e in encl)}", file=sys.stderr)
            return 0
        if not 0 <= args.domain_id <= 232:
            raise ValueError(f"--domain-id must be 0..232, got {args.domain_id}")
        run_setup(args.keystore, encl, args.domain_id, execute=False if args.script_only else None)
        return 0
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
