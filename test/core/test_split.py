"""The model split is exact: edge half + server half (the vision half, then the language backend) ==
the unsplit model, for every split point and both families."""

import numpy as np
import pytest
from edge_vlm_ros.core.backend import GenerateItem, LanguageBackend
from edge_vlm_ros.core.split import drop_language_model, load_vlm, model_fingerprint
from edge_vlm_ros.fixtures.tiny_models import build_tiny_idefics3, build_tiny_llava
from edge_vlm_ros.core.types import SplitPoint


@pytest.fixture(scope="module", params=["llava-llama", "llava-qwen2", "idefics3"])
def adapter(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "idefics3":
        build_tiny_idefics3(path)
    else:
        build_tiny_llava(path, language_model=request.param.split("-")[1])
    return load_vlm(path)


def _images(n, size=32, seed=0):
    rng = np.random.RandomState(seed)
    return [(rng.rand(size, size, 3) * 255).astype(np.uint8) for _ in range(n)]


QUESTIONS = ["what color is the shape ?", "how many objects are there ?", "is there a red circle ?"]


def _splits(a):
    return ["projector", "vision_block:0", "vision_block:1", f"vision_block:{a.num_vision_blocks}", "none"]


def test_every_split_equals_monolithic_generate(adapter):
    imgs = _images(3)
    ref = [adapter.monolithic_generate(im, q, 8, 8) for im, q in zip(imgs, QUESTIONS)]
    lm = adapter.language
    assert isinstance(lm, LanguageBackend) and lm.fingerprint == adapter.fingerprint
    assert len({tuple(r) for r in ref}) == 3, "tiny model output must depend on its input"
    for sp in _splits(adapter):
        split = SplitPoint.parse(sp)
        items = []
        for im, q in zip(imgs, QUESTIONS):
            if split.kind == "none":
                tok = adapter.server_forward_images([im])[0]
            else:
                feats = adapter.edge_forward(adapter.preprocess(im), split)
                assert tuple(feats.shape) == adapter.edge_output_shape(split)
                tok = adapter.server_forward(feats[None], split)[0]
            items.append(GenerateItem(lm.prompt_ids(q, tok.shape[0]), tok, 8))
        assert lm.generate(items, min_new_tokens=8) == ref, sp          # batched, left padded
        assert [lm.generate([it], 8)[0] for it in items] == ref, sp      # one by one


def test_prompt_ids_equal_processor(adapter):
    img = _images(1)[0]
    text = adapter.language.prompt_text("what is in the image ?")
    want = adapter.processor(images=[adapter.reference_image(img)], text=text, return_tensors="pt")["input_ids"][0]
    n = int((want == adapter.image_token_id).sum())
    assert adapter.language.prompt_ids("what is in the image ?", n) == want.tolist()
    assert adapter.language.count_text_tokens("what is in the image ?") > 0


def test_split_point_parsing_and_range(adapter):
    assert str(SplitPoint.parse("vision_block:3")) == "vision_block:3"
    for bad in ["", "vision_block", "vision_block:-1", "block:2", "projector:1"]:
        with pytest.raises(ValueError):
            SplitPoint.parse(bad)
    with pytest.raises(ValueError, match="k must be in"):
        adapter.check_split(SplitPoint("vision_block", adapter.num_vision_blocks + 1))


def test_fingerprint_is_content_based(adapter, tmp_path):
    assert len(adapter.fingerprint) == 16
    other = load_vlm(build_tiny_llava(tmp_path / "other", seed=123))
    assert other.fingerprint != adapter.fingerprint
    assert model_fingerprint(adapter.model, adapter.family) == adapter.fingerprint


def test_dropping_the_language_model_drops_the_backend(tmp_path):
    """The robot frees the language model; a backend built before must not keep it alive."""
    a = load_vlm(build_tiny_llava(tmp_path / "edge"))
    assert a.language.prompt_ids("a", 4)             # built and cached
    drop_language_model(a)
    assert "language" not in a.__dict__
    with pytest.raises(RuntimeError, match="dropped"):
        _ = a.language
    assert a.edge_forward(a.preprocess(_images(1)[0]), SplitPoint.parse("projector")).ndim == 2
