"""Procedural visual question answering scenes: the task the reference VLM is trained and measured on.

No data set can be downloaded on the project's machines, so the accuracy the pipeline is judged by
comes from scenes drawn here: one to four shapes (circle, square, triangle, star) in five colors and
two sizes, each in its own cell of a 3x3 grid, on a plain or textured, noisy background. Every scene
comes with a caption and short-answer questions of five types (color, shape, count, position,
presence) whose answers are read off the scene description, never off the pixels, so they are right
by construction.

Everything is a pure function of a seed: scene `i` of split `s` is drawn from its own generator
seeded with `(seed, split id, i)`, so a scene does not depend on how many scenes were asked for, and
the same seed gives the same bytes on every machine. ROS-free; the rosbag2 export and the training
and evaluation tools reuse `iter_split`.

On-disk format (written by `write_dataset`, documented again in the README.md it writes):

    <root>/dataset.json          generator settings, seed, counts per split and type
    <root>/<split>.jsonl         one question per line:
                                 {"image": "<split>/000123.png", "question": ..., "answer": ...,
                                  "type": ..., "caption": ..., "scene_id": 123, "objects": [...]}
    <root>/<split>/<id>.png      RGB, IMAGE_SIZE x IMAGE_SIZE, 8 bits per channel
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import cv2
import numpy as np

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGE_SIZE = 64
GRID = 3
SPLITS = ("train", "validation", "test")
# Part of every scene's generator seed, so that the splits draw from disjoint random streams.
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}

SHAPES = ("circle", "square", "triangle", "star")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
# Saturated and far apart in hue, so that jitter, noise and anti-aliasing never make one look like
# another; the background stays grey so that it never looks like any of them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
}
SIZES = ("small", "large")
# Radii in pixels at IMAGE_SIZE = 64; a grid cell is 21 pixels wide.
_RADIUS = {"small": 5.5, "large": 9.0}
# Row-major 3x3 cell names; a cell index is row * 3 + column.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "position", "presence")
MAX_OBJECTS = 4

_SUPERSAMPLE = 4  # shapes are drawn 4x larger and shrunk with area averaging: smooth, recognisable edges


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. `cell` is the 3x3 grid cell (row * 3 + column); `center` is in pixels (x, y)."""

    shape: str
    color: str
    size: str
    cell: int
    center: tuple[float, float]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"color {self.color!r} is not one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"size {self.size!r} is not one of {SIZES}")
        if not 0 <= self.cell < GRID * GRID:
            raise ValueError(f"cell {self.cell} is outside the {GRID}x{GRID} grid")

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "cell": self.cell,
                "position": self.position, "center": [round(self.center[0], 3), round(self.center[1], 3)]}


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    type: str


@dataclass(frozen=True)
class Scene:
    """A drawn scene: the image, the objects in it and the questions asked about it."""

    scene_id: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: tuple[SceneObject, ...]
    caption: str
    questions: tuple[Question, ...]


class VqaItem(NamedTuple):
    """One question about one image, as the rosbag export and the evaluation consume it."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    question: str
    answer: str
    type: str


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator scene `index` of `split` is drawn from; independent of how many scenes exist."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def sample_objects(rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> tuple[SceneObject, ...]:
    """One to four objects in distinct cells, with no two sharing both shape and color.

    Unique (color, shape) pairs keep every question that names an object unambiguous.
    """
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    kinds = rng.choice(len(SHAPES) * len(COLORS), size=n, replace=False)
    cell_px = image_size / GRID
    scale = image_size / IMAGE_SIZE
    colors = tuple(COLORS)
    objects = []
    for cell, kind in zip(cells, kinds):
        size = SIZES[int(rng.integers(len(SIZES)))]
        r = _RADIUS[size] * scale
        slack = max(cell_px / 2 - r - 0.5 * scale, 0.0)  # jitter inside the cell, never across its edge
        row, col = divmod(int(cell), GRID)
        cx = (col + 0.5) * cell_px + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell_px + rng.uniform(-slack, slack)
        objects.append(SceneObject(shape=SHAPES[int(kind) // len(COLORS)], color=colors[int(kind) % len(COLORS)],
                                   size=size, cell=int(cell), center=(float(cx), float(cy))))
    return tuple(sorted(objects, key=lambda o: o.cell))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grey background, plain or with a smooth random texture, plus pixel noise. (H, W, 3) float32."""
    base = rng.uniform(60.0, 140.0)
    img = np.full((size, size, 3), base, np.float32)
    if rng.random() < 0.6:
        grid = int(rng.integers(3, 7))
        coarse = rng.normal(0.0, rng.uniform(8.0, 22.0), size=(grid, grid, 1)).astype(np.float32)
        img += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)[..., None]
    # a faint colour cast, well below the palette's saturation
    img += rng.normal(0.0, 4.0, size=(1, 1, 3)).astype(np.float32)
    return img


def _star_points(cx: float, cy: float, r: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _draw(canvas: np.ndarray, obj: SceneObject, rgb: Sequence[float], ss: int) -> None:
    """Draw one filled shape on a supersampled canvas (coordinates scaled by `ss`)."""
    cx, cy = obj.center[0] * ss, obj.center[1] * ss
    r = _RADIUS[obj.size] * canvas.shape[0] / IMAGE_SIZE  # radii are given for 64-pixel images
    color = tuple(float(c) for c in rgb)
    if obj.shape == "circle":
        cv2.circle(canvas, (round(cx), round(cy)), round(r * 0.95), color, -1, cv2.LINE_AA)
        return
    if obj.shape == "square":
        h = 0.82 * r  # about the circle's area, so that size does not give the shape away
        pts = np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    elif obj.shape == "triangle":
        pts = np.array([[cx, cy - r], [cx + 0.95 * r, cy + 0.75 * r], [cx - 0.95 * r, cy + 0.75 * r]])
    else:
        pts = _star_points(cx, cy, r * 1.08)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], color, cv2.LINE_AA)


def render(objects: Sequence[SceneObject], rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw `objects` on a random background. Returns (H, W, 3) uint8 RGB."""
    ss = _SUPERSAMPLE
    bg = _background(rng, image_size * ss)
    canvas = bg.copy()
    for obj in objects:
        jitter = rng.normal(0.0, 8.0, size=3)
        _draw(canvas, obj, np.clip(np.array(COLORS[obj.color], np.float64) + jitter, 0, 255), ss)
    img = cv2.resize(canvas, (image_size, image_size), interpolation=cv2.INTER_AREA)
    img += rng.normal(0.0, rng.uniform(2.0, 7.0), size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def caption(objects: Sequence[SceneObject]) -> str:
    parts = [f"{o.phrase()} {'in the' if o.position == 'center' else 'at the'} {o.position}" for o in objects]
    head = f"{NUMBERS[len(objects)]} shape{'s' if len(objects) > 1 else ''}: "
    if len(parts) == 1:
        return head + parts[0] + "."
    return head + ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def _refer(obj: SceneObject, objects: Sequence[SceneObject], rng: np.random.Generator) -> str:
    """The shortest unambiguous name of `obj`: 'the star' if it is the only star, else 'the red star'."""
    unique_shape = sum(o.shape == obj.shape for o in objects) == 1
    if unique_shape and rng.random() < 0.7:
        return f"the {obj.shape}"
    return f"the {obj.color} {obj.shape}"


def ask(objects: Sequence[SceneObject], qtype: str, rng: np.random.Generator) -> Question | None:
    """One question of `qtype` about `objects`, or None when the scene cannot pose one unambiguously."""
    if qtype == "color":
        # Only an object whose shape is unique can be named without giving away its colour.
        cands = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        return Question(f"what color is the {o.shape}?", o.color, qtype)
    if qtype == "shape":
        cands = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        return Question(f"what shape is the {o.color} object?", o.shape, qtype)
    if qtype == "position":
        o = objects[int(rng.integers(len(objects)))]
        return Question(f"where is {_refer(o, objects, rng)}?", o.position, qtype)
    if qtype == "count":
        kind = rng.random()
        if kind < 0.4:
            return Question("how many shapes are there?", NUMBERS[len(objects)], qtype)
        if kind < 0.7:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            n = sum(o.shape == shape for o in objects)
            return Question(f"how many {SHAPE_PLURALS[shape]} are there?", NUMBERS[n], qtype)
        color = tuple(COLORS)[int(rng.integers(len(COLORS)))]
        n = sum(o.color == color for o in objects)
        return Question(f"how many {color} shapes are there?", NUMBERS[n], qtype)
    if qtype == "presence":
        present = {(o.color, o.shape) for o in objects}
        if rng.random() < 0.5:
            o = objects[int(rng.integers(len(objects)))]
            return Question(f"is there a {o.color} {o.shape}?", "yes", qtype)
        # Absent pairs that share a colour or a shape with something in the scene are the
        # informative negatives; prefer them so that "no" cannot be read off one attribute.
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(o.color == c or o.shape == s for o in objects)]
        pool = near if near and rng.random() < 0.75 else absent
        c, s = pool[int(rng.integers(len(pool)))]
        return Question(f"is there a {c} {s}?", "no", qtype)
    raise ValueError(f"question type {qtype!r} is not one of {QUESTION_TYPES}")


def make_scene(seed: int, split: str, index: int, questions_per_scene: int = 3,
               image_size: int = IMAGE_SIZE) -> Scene:
    """Scene `index` of `split` for `seed`: a pure function of its arguments.

    Question types are drawn without replacement (as long as there are types left), so every type
    is asked about equally often over a split.
    """
    if not 1 <= questions_per_scene <= len(QUESTION_TYPES):
        raise ValueError(f"questions_per_scene must be in 1..{len(QUESTION_TYPES)}, got {questions_per_scene}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 for the shapes to stay recognisable, got {image_size}")
    rng = scene_rng(seed, split, index)
    objects = sample_objects(rng, image_size)
    image = render(objects, rng, image_size)
    qs: list[Question] = []
    for qtype in rng.permutation(QUESTION_TYPES):
        if len(qs) == questions_per_scene:
            break
        q = ask(objects, str(qtype), rng)
        if q is not None:
            qs.append(q)
    return Scene(scene_id=index, image=image, objects=objects, caption=caption(objects), questions=tuple(qs))


def image_digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


_README = """# Procedural VQA scenes (edge_vlm_ros.data.scenes)

Generated by `python -m edge_vlm_ros.tools.make_dataset` (see dataset.json for the exact settings).

- `<split>.jsonl` (train, validation, test): one question per line, keys
  `image` (PNG path relative to this folder), `question`, `answer`, `type`
  (color | shape | count | position | presence), `caption`, `scene_id`, and `objects`
  (the drawn shapes: shape, color, size, grid cell 0-8 row-major, position name, center in pixels).
- `<split>/<scene_id>.png`: RGB, 8 bits per channel.
- Answers are single words or short phrases: colors {colors}; shapes {shapes};
  counts {numbers}; positions {positions}; presence yes | no.
- Scene `i` of a split is a pure function of (seed, split, i); the splits use disjoint random streams
  and no image appears in two splits.
"""


def write_dataset(root: str | Path, *, seed: int, n_train: int, n_val: int, n_test: int,
                  questions_per_scene: int = 3, image_size: int = IMAGE_SIZE) -> dict:
    """Write all three splits under `root` and return the summary also written to dataset.json.

    Raises ValueError if two splits would share an image (never seen in practice: the backgrounds
    carry per-pixel noise, but the check is what makes the disjointness a fact rather than a hope).
    """
    root = Path(root)
    counts = {"train": n_train, "validation": n_val, "test": n_test}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"number of {split} scenes must be >= 0, got {n}")
    root.mkdir(parents=True, exist_ok=True)
    seen: dict[str, str] = {}
    summary: dict = {"format_version": FORMAT_VERSION, "seed": seed, "image_size": image_size,
                     "questions_per_scene": questions_per_scene, "splits": {}}
    for split, n in counts.items():
        (root / split).mkdir(exist_ok=True)
        per_type = {t: 0 for t in QUESTION_TYPES}
        n_q = 0
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                scene = make_scene(seed, split, i, questions_per_scene, image_size)
                digest = image_digest(scene.image)
                if digest in seen:
                    raise ValueError(f"{split} scene {i} repeats an image of {seen[digest]}")
                seen[digest] = f"{split}/{i}"
                rel = f"{split}/{i:06d}.png"
                cv2.imwrite(str(root / rel), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
                objs = [o.to_json() for o in scene.objects]
                for q in scene.questions:
                    f.write(json.dumps({"image": rel, "question": q.question, "answer": q.answer, "type": q.type,
                                        "caption": scene.caption, "scene_id": i, "objects": objs}) + "\n")
                    per_type[q.type] += 1
                    n_q += 1
        summary["splits"][split] = {"scenes": n, "questions": n_q, "per_type": per_type}
        LOG.info("%s: %d scenes, %d questions", split, n, n_q)
    (root / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    (root / "README.md").write_text(_README.format(colors=" | ".join(COLORS), shapes=" | ".join(SHAPES),
                                                   numbers=" | ".join(NUMBERS), positions=" | ".join(POSITIONS)))
    return summary


def read_split(root: str | Path, split: str) -> list[dict]:
    """The records of `<root>/<split>.jsonl` (dicts with the keys documented above)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    path = Path(root) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {split} split at {path}; write one with edge_vlm_ros.tools.make_dataset")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_image(root: str | Path, rel: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a PNG of the dataset."""
    bgr = cv2.imread(str(Path(root) / rel), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {Path(root) / rel}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def iter_split(root: str | Path, split: str) -> Iterator[VqaItem]:
    """Yield (rgb uint8 (H, W, 3), question, answer, type) for every question of a written split.

    Images are read once per scene and shared by that scene's questions (read-only views).
    """
    cache_key, cache_img = None, None
    for rec in read_split(root, split):
        if rec["image"] != cache_key:
            cache_key, cache_img = rec["image"], load_image(root, rec["image"])
            cache_img.setflags(write=False)
        yield VqaItem(cache_img, rec["question"], rec["answer"], rec["type"])


def vocabulary_corpus() -> str:
    """Text covering every question, answer and caption word in context, for training a tokenizer.

    Words are written with the leading space they carry in a prompt or after "ASSISTANT:", so that a
    byte-level BPE learns them as single tokens and answers are one or two tokens long.
    """
    lines = []
    for shape in SHAPES:
        lines.append(f"what color is the {shape}? where is the {shape}? how many {SHAPE_PLURALS[shape]} are there?")
    for color in COLORS:
        lines.append(f"what shape is the {color} object? how many {color} shapes are there?")
        lines += [f"is there a {color} {shape}? where is the {color} {shape}?" for shape in SHAPES]
        lines += [f"{NUMBERS[2]} shapes: a {size} {color} circle at the top and a {size} {color} star in the center."
                  for size in SIZES]
    for answer in (*COLORS, *SHAPES, *NUMBERS, *POSITIONS, "yes", "no"):
        lines.append(f"USER: <image>\nwhat is it? ASSISTANT: {answer} at the {answer}")
    return "\n".join(lines)
