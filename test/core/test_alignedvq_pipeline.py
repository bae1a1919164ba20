"""AlignedVQ parts in the deployed halves: the edge applies its pre-projection before the vq codec,
the server its post-projection after decoding (found by the codebook hash the message carries)."""

import threading

import numpy as np
import torch

from edge_vlm_ros.core.alignedvq import apply_alignedvq, find_dlp_part, load_server_parts
from edge_vlm_ros.training.alignedvq import AlignedVQ, save_alignedvq
from edge_vlm_ros.core.config import EdgeConfig, ServerConfig
from edge_vlm_ros.core.edge import EdgeEncoder
from edge_vlm_ros.training.kmeans import KMeansConfig, kmeans
from edge_vlm_ros.codecs.codebook import Codebook
from edge_vlm_ros.core.server import ServerEngine
from edge_vlm_ros.core.backend import GenerateItem
from edge_vlm_ros.core.split import load_vlm
from edge_vlm_ros.fixtures.tiny_models import build_tiny_llava
from edge_vlm_ros.core.types import Outcome, PromptRequest, SplitPoint
from edge_vlm_ros.codecs.vq import load_server_codecs, make_vq_codec


def test_edge_and_server_apply_their_alignedvq_parts(tmp_path):
    torch.manual_seed(0)
    model = build_tiny_llava(tmp_path / "llava")
    adapter = load_vlm(model)
    split = SplitPoint.parse("vision_block:2")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    feats = torch.cat([adapter.edge_forward(adapter.preprocess(im), split) for im in images])   # (6*T, D)
    centroids = kmeans(feats, KMeansConfig(k=32, iters=5, seed=0, progress=False)).centroids
    cb = Codebook.from_codewords(centroids, model_fingerprint=adapter.fingerprint, placement=str(split))
    avq = AlignedVQ(cb)
    with torch.no_grad():                      # as if fine-tuned: open the gates
        avq.pre.gate.fill_(0.5)
        avq.post.gate.fill_(-0.3)
    saved = save_alignedvq(avq.eval(), tmp_path / "cb.safetensors")

    edge = EdgeEncoder.from_config(EdgeConfig(split_point=str(split), codec="vq",
                                              codebook_path=str(saved.codebook_path)), str(model))
    assert edge.dlp_edge is not None
    answers, lock = {}, threading.Condition()

    def emit(route, a):
        with lock:
            answers[a.request_id] = a
            lock.notify_all()
    cfg = ServerConfig(robots=["robot_0"], codebook_paths=[str(saved.codebook_path)], default_max_new_tokens=6,
                       ignore_eos=True)
    server = ServerEngine(adapter, cfg, emit, None, load_server_codecs(cfg.codebook_paths, adapter.fingerprint))
    server.start()
    try:
        img = images[0]
        pkt = edge.encode(img, "robot_0-x-1", 0)
        server.submit_prompt(PromptRequest("robot_0-x-1", "robot_0", "what color ?"), "robot_0")
        server.submit_features(pkt, "robot_0")
        with lock:
            assert lock.wait_for(lambda: "robot_0-x-1" in answers, 30)
        got = answers["robot_0-x-1"]
        assert got.outcome is Outcome.OK, got.reason
    finally:
        server.stop()
    # The same path by hand: pre-projection, codec, post-projection, rest of the model.
    codec = make_vq_codec(str(saved.codebook_path))
    pre = find_dlp_part(saved.codebook_path, "edge", codec.codebook_hash)
    post = load_server_parts([str(saved.codebook_path)], adapter.fingerprint)[codec.codebook_hash]
    x = apply_alignedvq(pre, adapter.edge_forward(adapter.preprocess(img), split))
    z = apply_alignedvq(post, codec.decode(codec.encode(x)))
    tokens = adapter.server_forward(z[None], split)[0]
    lm = adapter.language
    want = lm.generate([GenerateItem(lm.prompt_ids("what color ?", tokens.shape[0]), tokens, 6)], 6)[0]
    assert got.token_ids == want
    # ...and the parts matter: without them the features the LM sees differ.
    plain = codec.decode(codec.encode(adapter.edge_forward(adapter.preprocess(img), split)))
    assert not torch.allclose(plain, z)
