"""bag/cdr.py: messages of any type stored as their CDR bytes, with the definitions in the bag."""

from pathlib import Path

import numpy as np
import pytest

from edge_vlm_ros.bag.cdr import RawRecord, read_raw_bag, typestore_with, write_raw_bag
from edge_vlm_ros.bag.io import Storage, bag_info

MSG_DIR = Path(__file__).resolve().parents[2] / "msg"
DEFS = {f"edge_vlm_ros/msg/{f.stem}": f.read_text() for f in MSG_DIR.glob("*.msg")}
PROMPT = "edge_vlm_ros/msg/Prompt"


def _prompt_bytes(ts, text: str, rid: str) -> bytes:
    T = ts.types
    auth = T["edge_vlm_ros/msg/MessageAuth"](stamp_ns=5, mac=np.arange(16, dtype=np.uint8))
    header = T["std_msgs/msg/Header"](stamp=T["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="")
    msg = T[PROMPT](header=header, request_id=rid, robot_id="robot_0", text=text, task="vqa", max_new_tokens=3,
                    episode_id="", proprio=np.zeros(0, "float32"),
                    deadline=T["builtin_interfaces/msg/Time"](sec=9, nanosec=0), auth=auth)
    return bytes(ts.serialize_cdr(msg, PROMPT))


@pytest.mark.parametrize("storage", [Storage.SQLITE3, Storage.MCAP])
def test_round_trip_keeps_bytes_and_definitions(tmp_path, storage):
    ts = typestore_with(DEFS)
    recs = [RawRecord("/edge_vlm/prompt", PROMPT, 1_000 + i, _prompt_bytes(ts, f"q{i}", f"r{i}")) for i in range(3)]
    bag = tmp_path / "bag"
    assert write_raw_bag(bag, reversed(recs), DEFS, storage=storage) == {"/edge_vlm/prompt": 3}
    back = list(read_raw_bag(bag))
    assert back == recs     # log-time order, bytes untouched
    assert bag_info(bag).topics["/edge_vlm/prompt"].msgtype == PROMPT
    # self-describing: a reader without this package's types decodes it from the embedded definitions
    from rosbags.highlevel import AnyReader

    with AnyReader([bag]) as reader:
        texts = [reader.deserialize(raw, c.msgtype).text for c, _, raw in reader.messages()]
    assert texts == ["q0", "q1", "q2"]


def test_errors_name_the_problem(tmp_path):
    ts = typestore_with(DEFS)
    rec = RawRecord("/p", PROMPT, 1, _prompt_bytes(ts, "q", "r"))
    with pytest.raises(ValueError, match="no definition for 'edge_vlm_ros/msg/Nope'"):
        write_raw_bag(tmp_path / "a", [RawRecord("/p", "edge_vlm_ros/msg/Nope", 1, b"\0\1\0\0")], DEFS)
    with pytest.raises(ValueError, match="topic /p holds edge_vlm_ros/msg/Prompt"):
        write_raw_bag(tmp_path / "b", [rec, RawRecord("/p", "std_msgs/msg/String", 2, b"\0\1\0\0")], DEFS)
    with pytest.raises(ValueError, match="pkg/msg/Name"):
        typestore_with({"Prompt": "string a"})
    write_raw_bag(tmp_path / "c", [rec], DEFS)
    with pytest.raises(FileExistsError):
        write_raw_bag(tmp_path / "c", [rec], DEFS)
    with pytest.raises(ValueError, match=r"topics \['/q'\] are not in bag"):
        list(read_raw_bag(tmp_path / "c", ["/q"]))
    with pytest.raises(FileNotFoundError):
        list(read_raw_bag(tmp_path / "missing"))
