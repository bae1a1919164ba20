"""The procedural VQA generator: deterministic, answers true to the pixels, disjoint splits."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from edge_vlm_ros.data import scenes as S

PALETTE = np.array(list(S.COLORS.values()), np.float64)


def _blobs(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of saturated pixels: the background is grey, every shape is saturated."""
    img = image.astype(np.int32)
    sat = ((img.max(-1) - img.min(-1)) > 70).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(sat, connectivity=4)
    return labels, stats


def _scenes(n: int, seed: int = 3, split: str = "test") -> list[S.Scene]:
    return [S.make_scene(seed, split, i) for i in range(n)]


def test_same_seed_same_scene_and_other_seed_differs() -> None:
    for i in range(20):
        a, b = S.make_scene(5, "train", i), S.make_scene(5, "train", i)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.objects == b.objects and a.questions == b.questions and a.caption == b.caption
    assert S.make_scene(5, "train", 0).image.tobytes() != S.make_scene(6, "train", 0).image.tobytes()
    assert S.make_scene(5, "train", 0).image.tobytes() != S.make_scene(5, "validation", 0).image.tobytes()


def test_pixels_match_the_scene_description() -> None:
    for scene in _scenes(150):
        assert scene.image.dtype == np.uint8 and scene.image.shape == (S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
        labels, stats = _blobs(scene.image)
        blobs = [k for k in range(1, len(stats)) if stats[k, 4] >= 6]
        assert len(blobs) == len(scene.objects), scene.caption
        cell = S.IMAGE_SIZE / S.GRID
        for obj in scene.objects:
            x, y = int(obj.center[0]), int(obj.center[1])
            nearest = list(S.COLORS)[int(np.argmin(((PALETTE - scene.image[y, x]) ** 2).sum(1)))]
            assert nearest == obj.color, (scene.caption, obj)
            assert S.POSITIONS[int(y // cell) * S.GRID + int(x // cell)] == obj.position
            k = labels[y, x]
            bx, by, w, h, area = stats[k]
            fill = area / (w * h)
            rows = (labels[by:by + h, bx:bx + w] == k).sum(1)
            if obj.shape == "square":
                assert fill > 0.83, (obj, fill)
            elif obj.shape == "circle":
                assert 0.68 < fill < 0.9, (obj, fill)
            else:
                assert fill < 0.65, (obj, fill)
                widest = int(np.argmax(rows)) / h  # a triangle is widest at its base, a star at its arms
                assert (widest > 0.5) == (obj.shape == "triangle"), (obj, rows)


def _check_answer(q: S.Question, objects: tuple[S.SceneObject, ...]) -> None:
    text = q.question
    if q.type == "color":
        shape = re.fullmatch(r"what color is the (\w+)\?", text).group(1)
        (obj,) = [o for o in objects if o.shape == shape]
        assert q.answer == obj.color
    elif q.type == "shape":
        color = re.fullmatch(r"what shape is the (\w+) object\?", text).group(1)
        (obj,) = [o for o in objects if o.color == color]
        assert q.answer == obj.shape
    elif q.type == "position":
        words = re.fullmatch(r"where is the (.+)\?", text).group(1).split()
        match = [o for o in objects if (o.shape == words[-1] and (len(words) == 1 or o.color == words[0]))]
        assert len(match) == 1 and q.answer == match[0].position
    elif q.type == "count":
        m = re.fullmatch(r"how many (\w+)(?: shapes)? are there\?", text)
        word = m.group(1)
        if word == "shapes":
            n = len(objects)
        elif word in S.COLORS:
            n = sum(o.color == word for o in objects)
        else:
            n = sum(S.SHAPE_PLURALS[o.shape] == word for o in objects)
        assert q.answer == S.NUMBERS[n]
    elif q.type == "presence":
        color, shape = re.fullmatch(r"is there a (\w+) (\w+)\?", text).groups()
        assert q.answer == ("yes" if any(o.color == color and o.shape == shape for o in objects) else "no")
    else:
        raise AssertionError(q.type)


def test_answers_follow_from_the_objects_and_types_are_balanced() -> None:
    counts = {t: 0 for t in S.QUESTION_TYPES}
    answers: dict[str, set[str]] = {t: set() for t in S.QUESTION_TYPES}
    for scene in _scenes(400):
        assert len({q.type for q in scene.questions}) == len(scene.questions) == 3
        assert scene.caption.startswith(S.NUMBERS[len(scene.objects)])
        for q in scene.questions:
            _check_answer(q, scene.objects)
            counts[q.type] += 1
            answers[q.type].add(q.answer)
    assert min(counts.values()) > 0.7 * max(counts.values()), counts
    assert answers["presence"] == {"yes", "no"}
    assert answers["color"] == set(S.COLORS) and answers["shape"] == set(S.SHAPES)
    assert answers["position"] == set(S.POSITIONS)


def test_written_splits_are_disjoint_and_read_back(tmp_path) -> None:
    summary = S.write_dataset(tmp_path, seed=11, n_train=24, n_val=8, n_test=8)
    assert json.loads((tmp_path / "dataset.json").read_text()) == summary
    digests: dict[str, set[str]] = {}
    for split in S.SPLITS:
        records = S.read_split(tmp_path, split)
        assert len(records) == summary["splits"][split]["questions"]
        assert set(records[0]) >= {"image", "question", "answer", "type", "caption"}
        files = {r["image"] for r in records}
        assert all(f.startswith(split + "/") for f in files)
        digests[split] = {hashlib.sha1(S.load_image(tmp_path, f).tobytes()).hexdigest() for f in files}
        items = list(S.iter_split(tmp_path, split))
        assert len(items) == len(records)
        first = S.make_scene(11, split, 0)
        assert np.array_equal(items[0].image, first.image)  # PNG is lossless
        assert (items[0].question, items[0].answer, items[0].type) == (
            first.questions[0].question, first.questions[0].answer, first.questions[0].type)
        img, question, answer, qtype = items[-1]
        assert img.dtype == np.uint8 and img.shape == (S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
        assert isinstance(question, str) and isinstance(answer, str) and qtype in S.QUESTION_TYPES
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


def test_invalid_arguments_raise_with_the_value() -> None:
    with pytest.raises(ValueError, match="'dev'"):
        S.make_scene(0, "dev", 0)
    with pytest.raises(ValueError, match="9"):
        S.make_scene(0, "train", 0, questions_per_scene=9)
    with pytest.raises(ValueError, match="hexagon"):
        S.SceneObject("hexagon", "red", "small", 0, (1.0, 1.0))


def test_data_package_does_not_import_rclpy() -> None:
    code = "import sys, edge_vlm_ros.data.scenes; assert 'rclpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
