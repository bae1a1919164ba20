"""The scripted LIBERO expert in the real simulator: a seeded episode succeeds by LIBERO's own goal
predicate, and the collection program writes a valid, resumable demonstration of it.

LIBERO runs in-process (no ROS graph). Rollouts are physics-only; the one rendered demonstration is
at 32x32 to keep the test short on a 2-core machine.
"""

import json
import os

import numpy as np
import pytest

from edge_vlm_ros.simulation.expert import ExpertConfig, mat_to_axis_angle, parse_goal, quat_to_mat


def require_libero() -> None:
    """LIBERO is part of the set-up: a broken install fails; skipped only where setup left it out."""
    from edge_vlm_ros.simulation.libero_sim import LiberoUnavailable, import_libero

    try:
        import_libero()
    except LiberoUnavailable as e:
        if os.environ.get("EDGE_VLM_WITH_LIBERO", "1") == "0":
            pytest.skip(f"EDGE_VLM_WITH_LIBERO=0: setup left LIBERO out ({e})")
        raise


SUITE, TASK = "libero_spatial", 0


def test_goal_parsing_and_rotations():
    assert parse_goal([["On", "akita_black_bowl_1", "plate_1"]]) == ("on", "akita_black_bowl_1", "plate_1")
    assert parse_goal([["In", "milk_1", "basket_1_contain_region"]])[0] == "in"
    for bad in ([], [["Open", "drawer"]], [["On", "a", "b"], ["On", "c", "d"]], [["Turnon", "stove", "x"]]):
        with pytest.raises(ValueError, match="expert scripts one"):
            parse_goal(bad)
    with pytest.raises(ValueError, match="pos_gain"):
        ExpertConfig(pos_gain=0.0)
    # a quarter turn about z round-trips through matrix and axis-angle
    q = np.array([0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4)])
    np.testing.assert_allclose(mat_to_axis_angle(quat_to_mat(q)), [0, 0, np.pi / 2], atol=1e-9)


def test_expert_succeeds_and_collection_writes_resumable_demo(tmp_path):
    """One seeded expert episode (its first attempt) succeeds by the env's `done`; its demonstration
    is rendered, written, valid; a second run skips it."""
    require_libero()
    from edge_vlm_ros.training.collect_demos import main
    from edge_vlm_ros.training.demos import read_task_file

    out, report_path = str(tmp_path / "demos"), str(tmp_path / "report.json")
    # demo 0 starts from init state 20 (0..19 are evaluation's); one attempt: the expert must succeed
    assert main(["--suite", SUITE, "--tasks", str(TASK), "--per-task", "1", "--out", out, "--seed", "0",
                 "--image-size", "32", "--max-attempts", "1", "--report", report_path]) == 0
    summary = json.load(open(report_path))["tasks"][0]
    assert summary["expert_attempts"] == 1 and summary["expert_successes"] == 1, summary
    assert summary["demos"] == 1, summary
    folder = os.path.join(out, SUITE)
    (name,) = os.listdir(folder)              # the task file alone: the working folder is gone
    assert name.endswith("_demo.hdf5") and summary["file"] == os.path.join(folder, name)
    path = os.path.join(folder, name)
    info, (demo,) = read_task_file(path)
    t = len(demo)
    assert demo.agentview.shape == (t, 32, 32, 3) and demo.wrist.shape == (t, 32, 32, 3)
    assert demo.proprio.shape == (t, 8) and demo.dones[-1] == 1
    assert demo.attrs["init_state_index"] == 20 and demo.attrs["instruction"].startswith("pick up the black bowl")
    assert demo.agentview.std() > 5   # a rendered scene, not a blank frame
    assert "<mujoco" in demo.model_file   # LIBERO's model_file attribute: the scene's XML
    acts = demo.actions
    assert np.abs(acts).max() <= 1.0
    assert (acts[:, 6] == 1.0).any() and (acts[:, 6] == -1.0).any()   # it closed and opened the gripper
    assert demo.dones.sum() == 1 and demo.rewards[-1] == 1.0
    assert info.instruction == demo.instruction and info.problem_info["problem_name"]
    assert info.bddl_file_content.lstrip().startswith("(define")
    assert info.collection["eval_init_states"] == list(range(20)) and info.collection["summary"]["demos"] == 1
    # resumable: a second run finds the episode in the file and leaves the file untouched
    mtime = os.stat(path).st_mtime_ns
    assert main(["--suite", SUITE, "--tasks", str(TASK), "--per-task", "1", "--out", out, "--seed", "0",
                 "--image-size", "32", "--report", report_path]) == 0
    assert json.load(open(report_path))["tasks"][0]["demos"] == 1
    assert os.stat(path).st_mtime_ns == mtime and os.listdir(folder) == [name]
    # --cameras agentview: the same episode, its agentview frames bit-identical, no wrist camera
    # rendered; a rerun asking for both cameras into that folder is refused, naming the file
    out2 = str(tmp_path / "demos-agentview")
    assert main(["--suite", SUITE, "--tasks", str(TASK), "--per-task", "1", "--out", out2, "--seed", "0",
                 "--image-size", "32", "--max-attempts", "1", "--cameras", "agentview"]) == 0
    info2, (only,) = read_task_file(os.path.join(out2, SUITE, name))
    assert only.wrist is None and only.attrs["cameras"] == ["agentview"]
    np.testing.assert_array_equal(only.agentview, demo.agentview)
    np.testing.assert_array_equal(only.actions, demo.actions)
    assert info2.env_args["env_kwargs"]["camera_names"] == ["agentview"]
    assert info2.collection["cameras"] == ["agentview"]
    with pytest.raises(ValueError, match="record cameras \\['agentview'\\]"):
        main(["--suite", SUITE, "--tasks", str(TASK), "--per-task", "2", "--out", out2, "--seed", "0",
              "--image-size", "32", "--max-attempts", "1"])
