"""The accuracy study on a handful of questions with the shipped reference model: complete, honest, exact where it must be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_vlm_ros.codecs.codebook import load_codebook
from edge_vlm_ros.data.scenes import QUESTION_TYPES, load_image, read_split, write_dataset
from edge_vlm_ros.tools import accuracy_study as A
from edge_vlm_ros.core.model_paths import reference_model
from edge_vlm_ros.tools.make_dataset import write_split_bag

REF = reference_model()
pytestmark = pytest.mark.skipif(REF is None, reason="models/reference-llava is not in this checkout")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study-data")
    write_dataset(root, seed=3, n_train=40, n_val=2, n_test=6)
    return root


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_study_rows_are_complete_lossless_rows_equal_monolithic_and_bytes_are_whole_messages(data_dir, tmp_path):
    out = tmp_path / "study"
    argv = ["--model", str(REF), "--data", str(data_dir), "--out", str(out), "--k", "16,32",
            "--placements", "vision_block:1,vision_block:1/ln1,projector", "--calib-images", "40",
            "--iters", "5", "--threads", "1", "--no-progress"]
    assert A.main(argv) == 0
    report = json.loads((out / "accuracy.json").read_text())
    n_q = len(read_split(data_dir, "test"))
    assert report["questions"] == n_q and report["calib_split"] == "train" and report["calib_images"] == 40
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["monolithic"]["bytes_per_image"] is None
    lossless = [r for r in report["rows"] if r["family"] == "lossless"]
    # every split point of the 4-block tower (LLaVA reads layer -2: blocks 0..3 used) + projector + image
    assert {r["placement"] for r in lossless} == {"vision_block:0", "vision_block:1", "vision_block:2",
                                                  "vision_block:3", "projector", "none"}
    for r in lossless:
        assert r["differs_from_monolithic"] == 0 and r["accuracy"] == rows["monolithic"]["accuracy"], r["name"]
    for name in ("JPEG-90", "JPEG-10"):
        assert rows[name]["placement"] == "none"
    vq = [r for r in report["rows"] if r["family"] == "vq"]
    assert len(vq) == 6
    for r in vq:
        assert r["failures"] == {}, r
        # honest bytes: the whole message, and the indices are a small part of it
        assert r["bytes_per_image"] > r["payload_bytes"] + r["side_info_bytes"]
        cb = load_codebook(r["codebook"])
        assert cb.placement == r["placement"] and cb.k == r["k"] and cb.content_hash == r["codebook_hash"]
        assert set(r["per_type"]) <= set(QUESTION_TYPES)
        right = r["accuracy"] * r["questions"]        # a count of right answers, at most every question
        assert right == pytest.approx(round(right)) and 0 <= round(right) <= r["questions"], r
    ln1 = [r for r in vq if r["placement"].endswith("/ln1")]
    assert all(r["side_info_bytes"] > 0 for r in ln1)          # the per-token mean/std travel and count
    assert all(r["side_info_bytes"] == 0 for r in vq if r not in ln1)
    # one per K (ln1 vs residual at block 1, with its paired test) and the summary, then per placement
    # the cheapest quantized row within its margin of lossless (or the closest one)
    f = report["findings"]
    assert len(f) == 6 and all("McNemar" in x for x in f[:2]) and "of 2 pairs" in f[2]
    assert [x.split(" ")[0] for x in f[3:]] == ["projector:", "vision_block:1:", "vision_block:1/ln1:"]
    assert all("of lossless" in x for x in f[3:])
    assert not any("_correct" in r for r in report["rows"])
    md = (out / "accuracy.md").read_text()
    assert "| monolithic |" in md and "vq vision_block:1/ln1 K=32" in md
    assert (out / "accuracy_vs_bytes.png").stat().st_size > 10_000

    # A second run reuses the calibrated codebooks (same files, same hashes).
    before = {p.name: p.stat().st_mtime_ns for p in (out / "codebooks").iterdir()}
    assert A.main(argv[:-1] + ["--k", "16", "--no-progress"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "codebooks").iterdir()} == before


def test_vq_variants_train_their_codebooks_and_code_their_indices(data_dir, tmp_path):
    out = tmp_path / "variants"
    assert A.main(["--model", str(REF), "--data", str(data_dir), "--out", str(out), "--k", "16",
                   "--placements", "projector", "--vq-variants", "s2,g2+static", "--baselines", "placements",
                   "--calib-images", "40",
                   "--iters", "3", "--threads", "1", "--no-progress"]) == 0
    report = json.loads((out / "accuracy.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    one, s2, g2 = rows["vq projector K=16"], rows["vq projector K=16 s2"], rows["vq projector K=16 g2+static"]
    assert s2["family"] == g2["family"] == "vq_variant" and s2["failures"] == {} == g2["failures"]
    cb2, cbg = load_codebook(s2["codebook"]), load_codebook(g2["codebook"])
    assert (cb2.stages, cb2.groups, cb2.k) == (2, 1, 16) and (cbg.stages, cbg.groups) == (1, 2)
    assert s2["codebook"] != one["codebook"] != g2["codebook"]
    # two stages carry twice the 4-bit indices (bit-packed); the entropy-coded row says how it coded
    assert s2["payload_bytes"] == 2 * one["payload_bytes"]
    assert g2["options"] == {"entropy": "static"} and s2["options"] == {}
    assert any(x.startswith("projector:") for x in report["findings"])
    # focused: the monolithic reference and the lossless row at the placement, nothing else
    assert {r["family"] for r in report["rows"]} == {"monolithic", "lossless", "vq", "vq_variant"}
    assert [r["placement"] for r in report["rows"] if r["family"] == "lossless"] == ["projector"]
    with pytest.raises(ValueError, match="VQ variant"):
        A.VqVariant.parse("s2x")


def test_alignedvq_row_serves_the_finetuned_codebook_with_its_parts_and_lora(data_dir, tmp_path):
    out = tmp_path / "avq"
    assert A.main(["--model", str(REF), "--data", str(data_dir), "--out", str(out), "--k", "",
                   "--alignedvq", "vision_block:1@16,vision_block:1@16s2", "--alignedvq-steps", "2",
                   "--calib-images", "40",
                   "--iters", "3", "--threads", "1", "--no-progress"]) == 0
    report = json.loads((out / "accuracy.json").read_text())
    avq, avq2 = [r for r in report["rows"] if r["family"] == "alignedvq"]
    assert avq["failures"] == {} and avq["k"] == 16
    # a residual-staged base: the fine-tuned codebook keeps both stages and codes two indices a token
    assert avq2["failures"] == {} and "2 stages" in avq2["name"]
    assert load_codebook(avq2["codebook"]).stages == 2
    assert avq2["payload_bytes"] - avq["payload_bytes"] == 16 * 4 // 8     # 16 tokens, 4 more bits each
    base = load_codebook(out / "codebooks" / "vision_block1_K16.safetensors")
    tuned = load_codebook(avq["codebook"])
    assert tuned.content_hash == avq["codebook_hash"] != base.content_hash
    ft = Path(avq["codebook"]).parent
    assert (ft / "codebook.dlp_edge.safetensors").is_file() and (ft / "codebook.dlp_server.safetensors").is_file()
    assert (ft / "lora").is_dir()
    assert not [r for r in report["rows"] if r["family"] == "vq"]


def test_alignedvq_spec_names_placement_size_and_base_layout():
    sp, k, v = A.parse_alignedvq_spec("vision_block:1@4096s4")
    assert (str(sp), k, v.stages, v.groups) == ("vision_block:1", 4096, 4, 1)
    sp, k, v = A.parse_alignedvq_spec("projector")
    assert (str(sp), k, v.tag) == ("projector", 256, "")
    for bad in ("projector@4096x", "projector@4096s2+static"):
        with pytest.raises(ValueError, match="alignedvq"):
            A.parse_alignedvq_spec(bad)


def test_split_bag_holds_every_question_before_its_frame(data_dir):
    from edge_vlm_ros.bag.io import ImageFrame, read_bag

    bag = write_split_bag(data_dir, "test", rate_hz=20.0)
    recs = read_split(data_dir, "test")
    got = list(read_bag(bag))
    assert len(got) == 2 * len(recs)
    for i, rec in enumerate(recs):
        prompt, frame = got[2 * i], got[2 * i + 1]
        assert prompt.topic == "/edge_vlm/prompt_text" and prompt.content == rec["question"]
        assert frame.topic == "/camera/image_raw" and isinstance(frame.content, ImageFrame)
        assert prompt.log_time_ns < frame.log_time_ns
        np.testing.assert_array_equal(frame.content.rgb, load_image(data_dir, rec["image"]))


def test_mcnemar_counts_discordant_pairs():
    a = [True, True, False, True, False, True]
    b = [True, False, False, False, True, True]
    only_a, only_b, z = A.mcnemar(a, b)
    assert (only_a, only_b) == (2, 1) and z == pytest.approx(1 / 3 ** 0.5)
    assert A.mcnemar(a, a) == (0, 0, 0.0)
