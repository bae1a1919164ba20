"""The SROS2 policy grants each enclave exactly its topics, covers every topic the nodes use, and the
keystore commands are the ones sros2 takes. With `ros2 security` (sros2) on PATH the commands are run
for real and the signed DDS permissions are read back; with sros2's Python package and lxml the
policy is validated against sros2's own schema. Without them those two tests skip, saying why."""

import ast
import importlib.util
import os
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edge_vlm_ros.tools import sros2

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "edge_vlm_ros"
ROBOTS = ["robot_0", "robot_1"]
NODE_SERVICES = {"describe_parameters", "get_parameter_types", "get_parameters", "list_parameters",
                 "set_parameters", "set_parameters_atomically", "get_type_description"}


def _resolve(name: str, ns: str, node: str) -> str:
    ns = ns.rstrip("/")
    if name.startswith("/"):
        return name
    if name.startswith("~/"):
        return f"{ns}/{node}/{name[2:]}"
    return f"{ns}/{name}"


def parse_policy(text: str) -> dict[str, dict[str, set[str]]]:
    """enclave path -> {publish, subscribe, reply, request, ...: fully qualified names}, as sros2
    merges every profile of an enclave into one DDS grant."""
    root = ET.fromstring(text)
    assert root.tag == "policy" and root.get("version") == "0.2.0"
    out: dict[str, dict[str, set[str]]] = {}
    for enc in root.iter("enclave"):
        grants = out.setdefault(enc.get("path"), {})
        for prof in enc.iter("profile"):
            for group in prof:
                for attr, value in group.attrib.items():
                    assert value == "ALLOW", (enc.get("path"), group.tag, attr, value)
                    for item in group:
                        grants.setdefault(attr, set()).add(_resolve(item.text, prof.get("ns"), prof.get("node")))
    return out


def _infra_pub(diagnostics=True):
    return {"/rosout", "/parameter_events"} | ({"/diagnostics"} if diagnostics else set())


def _infra_sub():
    return {"/parameter_events", "/clock"}


def expected(robots, replay=False):
    exp = {}
    for r in robots:
        exp[f"/edge_vlm/{r}"] = {
            "publish": _infra_pub() | {f"/{r}/edge_vlm/prompt", f"/{r}/edge_vlm/features", f"/{r}/edge_vlm/answer",
                                       f"/{r}/edge_vlm/action_chunk", f"/{r}/camera/image_raw",
                                       f"/{r}/camera/wrist/image_raw", f"/{r}/robot_state", f"/{r}/sim/episode",
                                       f"/{r}/edge_vlm/prompt_text", f"/{r}/edge_vlm/codec_switch",
                                       f"/{r}/edge_vlm/cancel"},
            "subscribe": _infra_sub() | {f"/{r}/camera/image_raw", f"/{r}/camera/image_raw/compressed",
                                         f"/{r}/edge_vlm/prompt_text",
                                         f"/{r}/edge_vlm/flow_control", f"/{r}/robot_state", f"/{r}/sim/episode",
                                         f"/{r}/edge_vlm/action", f"/{r}/edge_vlm/answer",
                                         f"/{r}/edge_vlm/action_chunk", f"/{r}/edge_vlm/prompt",
                                         f"/{r}/edge_vlm/server_answer", f"/{r}/edge_vlm/server_action_chunk",
                                         f"/{r}/edge_vlm/cancel"},
            "execute": {f"/{r}/edge_vlm/ask"},
            "call": {f"/{r}/edge_vlm/ask"},
            "reply": {f"{node}/{s}" for node in (f"/{r}/edge_vlm_edge", f"/{r}/edge_vlm_libero_bridge",
                                                 "/edge_vlm_client") for s in NODE_SERVICES}}
    exp["/edge_vlm/server"] = {
        "publish": _infra_pub() | {f"/{r}/edge_vlm/{t}" for r in robots for t in ("server_answer", "flow_control",
                                                                                    "server_action_chunk")},
        "subscribe": _infra_sub() | {f"/{r}/edge_vlm/{t}" for r in robots for t in ("prompt", "features", "cancel")},
        "reply": {f"/edge_vlm_server/{s}" for s in NODE_SERVICES}}
    exp["/edge_vlm/controller"] = {
        "publish": _infra_pub() | {f"/{r}/edge_vlm/{t}" for r in robots for t in ("action", "prompt_text")},
        "subscribe": _infra_sub() | {t for r in robots for t in (f"/{r}/edge_vlm/answer", f"/{r}/edge_vlm/action_chunk",
                                                                  f"/{r}/sim/episode", f"/{r}/robot_state")},
        "reply": {f"/edge_vlm_controller/{s}" for s in NODE_SERVICES}}
    if replay:
        exp["/edge_vlm/replay"] = {
            "publish": _infra_pub() | {"/clock"} | {f"/{r}/{t}" for r in robots
                                                    for t in ("camera/image_raw", "edge_vlm/prompt_text")},
            "subscribe": _infra_sub() | {f"/{r}/edge_vlm/flow_control" for r in robots},
            "reply": {f"/edge_vlm_replay/{s}" for s in NODE_SERVICES}}
    return exp


@pytest.mark.parametrize("replay", [False, True])
def test_policy_grants_exactly_the_expected_topics(replay):
    got = parse_policy(sros2.policy_xml(sros2.enclaves(ROBOTS, replay=replay)))
    assert got == expected(ROBOTS, replay)


def test_a_robot_cannot_touch_another_robots_topics():
    got = parse_policy(sros2.policy_xml(sros2.enclaves(ROBOTS)))
    r0 = got["/edge_vlm/robot_0"]
    assert "/robot_1/edge_vlm/features" not in r0["publish"]
    assert "/robot_1/edge_vlm/prompt" not in r0["publish"]
    assert "/robot_1/edge_vlm/answer" not in r0["subscribe"]
    assert not any(t.startswith("/robot_1/") for t in r0["publish"] | r0["subscribe"])
    # The server's outputs and the controller's actions are not the robot's to publish.
    assert "/robot_0/edge_vlm/flow_control" not in r0["publish"]
    assert "/robot_0/edge_vlm/action" not in r0["publish"]
    # Only the server publishes flow control and its outcomes; only robots publish requests and the
    # outcomes the robot's users see (the edge is their one publisher).
    for path, g in got.items():
        flows = {t for t in g["publish"] if t.endswith(("/flow_control", "/server_answer", "/server_action_chunk"))}
        requests = {t for t in g["publish"] if t.endswith(("/edge_vlm/prompt", "/edge_vlm/features",
                                                           "/edge_vlm/answer", "/edge_vlm/action_chunk"))}
        assert not flows or path == "/edge_vlm/server", path
        assert not requests or path.startswith("/edge_vlm/robot_"), path


# Calls that open a topic or an action, and which grant each needs: (function name, argument of the
# name, kind). `subscribe` is the nodes' CallbackGuard.subscribe (a create_subscription).
_OPENERS = {"create_publisher": (1, "publish"), "create_subscription": (1, "subscribe"),
            "subscribe": (1, "subscribe"), "ActionServer": (2, "execute"), "ActionClient": (2, "call")}


def _used_topics(path: Path) -> dict[str, set[str]]:
    """topics.NAME constants in each call of a source file that opens a topic or an action."""
    used: dict[str, set[str]] = {"publish": set(), "subscribe": set(), "execute": set(), "call": set()}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        fname = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if fname not in _OPENERS:
            continue
        pos, kind = _OPENERS[fname]
        if len(node.args) <= pos:
            continue
        arg = node.args[pos]
        names = {a.attr for a in ast.walk(arg) if isinstance(a, ast.Attribute) and a.attr.isupper()
                 and isinstance(a.value, ast.Name) and a.value.id == "topics"}
        if isinstance(arg, ast.Constant):
            names = {arg.value}
        # A name computed elsewhere (the replay's remapped outputs) is covered by the exact test.
        used[kind] |= names
    return used


# Source file -> enclave role ("robot" = the robot's own enclave).
NODE_ROLES = {"edge_node.py": "robot", "ask_server.py": "robot", "libero_bridge_node.py": "robot",
              "client.py": "robot", "server_node.py": "server", "controller_node.py": "controller",
              "replay_node.py": "replay"}


@pytest.mark.parametrize("source", sorted(NODE_ROLES))
def test_policy_covers_every_topic_the_nodes_use(source):
    """Derived from the node sources: a topic a node gains without the policy following fails here."""
    from edge_vlm_ros import topics

    role = NODE_ROLES[source]
    got = parse_policy(sros2.policy_xml(sros2.enclaves(ROBOTS, replay=True)))
    used = _used_topics(PKG / source)
    assert any(used.values()), source
    for kind, names in used.items():
        for name in names:
            if name == "DIAGNOSTICS":
                continue                       # (diagnostics.py's publisher: checked below)
            if name.startswith("/"):           # an absolute name (the replay's /clock)
                wanted = [(f"/edge_vlm/{role}", name)]
            else:
                value = getattr(topics, name)
                wanted = [(f"/edge_vlm/{r if role == 'robot' else role}", topics.for_robot(r, value)) for r in ROBOTS]
            for enclave, topic in wanted:
                assert topic in got[enclave][kind], f"{source}: {enclave} may not {kind} {topic}"


def test_every_node_may_publish_its_health_on_diagnostics():
    got = parse_policy(sros2.policy_xml(sros2.enclaves(ROBOTS, replay=True)))
    assert _used_topics(PKG / "diagnostics.py")["publish"] == {"DIAGNOSTICS"}
    for path, grants in got.items():
        assert "/diagnostics" in grants["publish"], path


def test_ask_action_and_cancel_grants():
    """The edge serves its robot's Ask action and the robot's client calls it; only the robot publishes
    its cancels and only the server (and the robot's own edge) reads them."""
    got = parse_policy(sros2.policy_xml(sros2.enclaves(ROBOTS, replay=True)))
    for r, other in (("robot_0", "robot_1"), ("robot_1", "robot_0")):
        mine = got[f"/edge_vlm/{r}"]
        assert mine["execute"] == {f"/{r}/edge_vlm/ask"} and mine["call"] == {f"/{r}/edge_vlm/ask"}
        assert f"/{other}/edge_vlm/ask" not in mine["execute"] | mine["call"]
        assert f"/{r}/edge_vlm/cancel" in mine["publish"] and f"/{other}/edge_vlm/cancel" not in mine["publish"]
        assert f"/{r}/edge_vlm/cancel" in got["/edge_vlm/server"]["subscribe"]
    publishers = {path for path, g in got.items() for t in g["publish"] if t.endswith("/edge_vlm/cancel")}
    assert publishers == {"/edge_vlm/robot_0", "/edge_vlm/robot_1"}
    actions = {path for path, g in got.items() if g.get("execute") or g.get("call")}
    assert actions == {"/edge_vlm/robot_0", "/edge_vlm/robot_1"}
    # The policy names the action once per profile; sros2 expands it into its services and topics.
    root = ET.fromstring(sros2.policy_xml(sros2.enclaves(["robot_0"])))
    edge, = [p for p in root.iter("profile") if p.get("node") == "edge_vlm_edge"]
    group, = edge.findall("actions")
    assert group.attrib == {"execute": "ALLOW"} and [a.text for a in group] == ["/robot_0/edge_vlm/ask"]


def test_action_dds_topics_are_sros2s_expansion():
    server = sros2.action_dds_topics("/robot_0/edge_vlm/ask", "execute")
    client = sros2.action_dds_topics("/robot_0/edge_vlm/ask", "call")
    assert "rq/robot_0/edge_vlm/ask/_action/send_goalRequest" in server["subscribe"]
    assert "rr/robot_0/edge_vlm/ask/_action/get_resultReply" in server["publish"]
    assert {"rt/robot_0/edge_vlm/ask/_action/feedback", "rt/robot_0/edge_vlm/ask/_action/status"} <= server["publish"]
    assert server["publish"] == client["subscribe"] and server["subscribe"] == client["publish"]
    assert len(server["publish"]) == 5 and len(server["subscribe"]) == 3
    with pytest.raises(ValueError, match="'serve'"):
        sros2.action_dds_topics("/a", "serve")


@pytest.mark.parametrize("bad", ["robot-0", "0robot", "", "a/b", "robot 0"])
def test_bad_robot_names_are_rejected_naming_them(bad):
    with pytest.raises(ValueError, match="robot name"):
        sros2.enclaves(["robot_0", bad])


def test_bad_enclave_root_and_repeats_rejected():
    with pytest.raises(ValueError, match="edge-vlm"):
        sros2.enclaves(ROBOTS, root="/edge-vlm")
    with pytest.raises(ValueError, match="repeat"):
        sros2.enclaves(["robot_0", "robot_0"])
    with pytest.raises(ValueError, match="at least one"):
        sros2.enclaves([])


def test_setup_without_sros2_writes_policy_and_the_exact_commands(tmp_path):
    ks = tmp_path / "key store"          # a space: the script must quote
    encl = sros2.enclaves(ROBOTS)
    res = sros2.run_setup(ks, encl, domain_id=42, execute=False, log=lambda s: None)
    assert not res["ran"]
    policy = ks / "edge_vlm_policy.xml"
    assert res["policy"] == policy and policy.read_text() == sros2.policy_xml(encl)
    assert not (ks / "enclaves").exists()    # nothing pretended
    script = res["script"].read_text()
    subprocess.run(["bash", "-n", str(res["script"])], check=True)
    assert os.access(res["script"], os.X_OK)
    q = f"'{ks}'"
    lines = script.splitlines()
    assert "export ROS_DOMAIN_ID=42" in lines
    assert f"[ -f {q}/enclaves/governance.p7s ] || ros2 security create_keystore {q}" in lines
    for e in ("/edge_vlm/robot_0", "/edge_vlm/robot_1", "/edge_vlm/server", "/edge_vlm/controller"):
        i = lines.index(f"ros2 security create_enclave {q} {e}")
        assert lines[i + 1] == f"ros2 security create_permission {q} {e} '{policy}'"
    assert sum(line.startswith("ros2 security create_enclave") for line in lines) == 4


def test_cli_policy_and_bad_input(tmp_path, capsys):
    out = tmp_path / "p.xml"
    assert sros2.main(["policy", "--robots", "robot_0", "robot_1", "--out", str(out)]) == 0
    assert parse_policy(out.read_text()) == expected(ROBOTS)
    assert sros2.main(["policy", "--robots", "robot-0"]) == 2
    assert "'robot-0'" in capsys.readouterr().err
    assert sros2.main(["setup", "--keystore", str(tmp_path / "k"), "--robots", "r", "--domain-id", "300"]) == 2
    assert sros2.main(["setup", "--keystore", str(tmp_path / "k"), "--robots", "robot_0", "--replay",
                       "--domain-id", "5", "--script-only"]) == 0
    script = (tmp_path / "k" / sros2.SCRIPT_FILE).read_text()
    assert "export ROS_DOMAIN_ID=5" in script and "create_enclave" in script and "/edge_vlm/replay" in script
    assert "nothing was created" in capsys.readouterr().out
    assert not (tmp_path / "k" / "enclaves").exists()


def _sros2_schema() -> Path | None:
    if importlib.util.find_spec("sros2") is None:
        return None
    from sros2.policy import get_policy_schema

    return Path(str(get_policy_schema("policy.xsd")))


def test_policy_validates_against_sros2_schema(tmp_path):
    lxml = pytest.importorskip("lxml.etree", reason="lxml is not installed (sros2 needs it; this venv has none)")
    schema = _sros2_schema()
    if schema is None or not schema.is_file():
        pytest.skip("sros2 is not installed here, so its policy.xsd is absent (a ROS 2 install has it)")
    xsd = lxml.XMLSchema(lxml.parse(str(schema)))
    doc = lxml.fromstring(sros2.policy_xml(sros2.enclaves(ROBOTS, replay=True)).encode())
    xsd.assertValid(doc)


@pytest.mark.skipif(not sros2.sros2_available(),
                    reason="`ros2 security` (sros2) is not on PATH: pip ROS 2 wheels carry neither ros2cli "
                           "nor sros2")
def test_setup_with_real_sros2_creates_enclaves_with_exact_permissions(tmp_path):
    ks = tmp_path / "ks"
    encl = sros2.enclaves(ROBOTS)
    res = sros2.run_setup(ks, encl, domain_id=42, log=lambda s: None)
    assert res["ran"] and sros2.is_keystore(ks)
    exp = expected(ROBOTS)
    for e in encl:
        d = ks / "enclaves" / e.path.lstrip("/")
        for f in ("cert.pem", "key.pem", "permissions.p7s", "governance.p7s", "identity_ca.cert.pem"):
            assert (d / f).exists(), d / f
        assert stat.S_IMODE((d / "key.pem").stat().st_mode) == 0o600
        dds = ET.parse(d / "permissions.xml").getroot()
        grant, = dds.iter("grant")
        assert grant.findtext("subject_name") == f"CN={e.path}" and grant.findtext("default") == "DENY"
        assert {i.text for i in grant.iter("id")} == {"42"}
        got = {"publish": set(), "subscribe": set()}
        for kind in got:
            for el in grant.iter(kind):
                got[kind] |= {t.text for t in el.iter("topic") if t.text != "ros_discovery_info"}
        services = exp[e.path]["reply"]
        want = {"publish": {"rt" + t for t in exp[e.path]["publish"]} | {f"rr{s}Reply" for s in services},
                "subscribe": {"rt" + t for t in exp[e.path]["subscribe"]} | {f"rq{s}Request" for s in services}}
        for kind in ("execute", "call"):
            for action in exp[e.path].get(kind, ()):
                for k, names in sros2.action_dds_topics(action, kind).items():
                    want[k] |= names
        assert got == want
    # A second run keeps the keystore (sros2 refuses to create one twice) and succeeds.
    assert sros2.run_setup(ks, encl, domain_id=42, log=lambda s: None)["ran"]


def test_private_keys_become_owner_only_and_links_are_left(tmp_path):
    (tmp_path / "private").mkdir()
    enc = tmp_path / "enclaves" / "edge_vlm" / "robot_0"
    enc.mkdir(parents=True)
    for f in (tmp_path / "private" / "ca.key.pem", enc / "key.pem", enc / "cert.pem"):
        f.write_text("x")
        f.chmod(0o644)
    (tmp_path / "private" / "identity_ca.key.pem").symlink_to("ca.key.pem")
    keys = sros2.restrict_private_keys(tmp_path)
    assert sorted(keys) == sorted([tmp_path / "private" / "ca.key.pem", enc / "key.pem"])
    assert stat.S_IMODE((enc / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((enc / "cert.pem").stat().st_mode) == 0o644
