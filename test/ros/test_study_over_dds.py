"""The accuracy study's in-process path is the deployed path: with the shipped reference model and a
VQ codebook after the projector, the answers that come back over real DDS from real edge and server
processes equal the ones accuracy_study.run_pipeline computes in one process for the same questions."""

import numpy as np
import pytest

from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.core.types import Outcome, SplitPoint
from edge_vlm_ros.data.scenes import VqaItem, make_scene
from edge_vlm_ros.tools import accuracy_study as A
from edge_vlm_ros.core.model_paths import reference_model

from ros_harness import running

REF = reference_model()
pytestmark = pytest.mark.skipif(REF is None, reason="models/reference-llava is not in this checkout")


def test_vq_answers_over_dds_equal_the_studys_in_process_answers(ros_env, tmp_path):
    adapter = load_vlm(REF)
    split = SplitPoint("projector")
    calib = [make_scene(5, "train", i).image for i in range(24)]
    cb = A.calibrate(adapter, split, calib, [64], tmp_path / "cb", seed=0, iters=5, progress=False)[64]
    scenes = [make_scene(5, "test", i) for i in range(4)]
    items = [VqaItem(s.image, q.question, q.answer, q.type) for s in scenes for q in s.questions[:2]]
    image_of = [i for i in range(len(scenes)) for _ in range(2)]
    row = A.Row("vq projector K=64", "vq", split, "vq", k=64, codebook=str(cb))
    want, info = A.run_pipeline(row, adapter, adapter, [s.image for s in scenes], items, image_of,
                                max_new_tokens=8, batch_size=4, progress=False)
    assert info["failures"] == {} and all(want)
    overrides = {"edge": {"model_path": str(REF), "split_point": "projector", "codec": "vq",
                          "codebook_path": str(cb), "max_new_tokens": 8},
                 "server": {"model_path": str(REF), "codebook_paths": [str(cb)], "max_batch_size": 4}}
    with running(ros_env, tmp_path, 1, overrides) as (_, client):
        got = []
        for it in items:
            ans = client.ask("robot_0", np.ascontiguousarray(it.image), it.question, timeout=60)
            assert ans is not None and ans.outcome is Outcome.OK, None if ans is None else ans.reason
            got.append(ans.text.strip())
    assert got == want
