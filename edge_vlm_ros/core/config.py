"""Configuration of every component: one frozen dataclass each, validated on construction.

These are the single source of configuration. Nodes declare their ROS parameters from these fields
(the `description` metadata becomes the ParameterDescriptor), config/*.yaml sets them, and the
bring-up tool and tests build the same dataclasses from the same YAML.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from .types import SplitPoint


def param(default: Any, description: str, live: bool = False) -> Any:
    """A config field declared as a ROS parameter. `live`: the running node applies a new value
    between requests (`ros2 param set` takes effect); otherwise the parameter is read-only while the
    node runs (set it in the params file and restart, or reconfigure a managed node)."""
    meta = {"description": description, "live": live}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def live_fields(cls: type) -> frozenset[str]:
    """Names of the fields of a config dataclass that a running node applies when they change."""
    return frozenset(f.name for f in fields(cls) if f.metadata.get("live", False))


# EdgeConfig fields a codec_ladder rung may set (the rest is the edge's, shared by every rung).
LADDER_SETTINGS = ("split_point", "codec", "codec_dtype", "jpeg_quality", "codebook_path", "token_stats_dtype")

# Message authentication, the same three parameters on the edge, the server and the controller.
AUTH_HELP = {
    "auth": "Authenticate every message between robot and server (HMAC-SHA256 with the robot's key). "
            "false lets any process on the DDS domain forge them; it is logged.",
    "auth_keys_dir": "Folder of the per-robot key files <robot>.key (create them with python -m "
                     "edge_vlm_ros.tools.keys create); empty: $EDGE_VLM_KEYS_DIR or ~/.config/edge_vlm_ros/keys.",
    "auth_max_age_s": "Freshness window: a message stamped further than this from the receiver's clock is "
                      "dropped (the hosts' clocks must agree within it).",
}

# The managed (lifecycle) nodes' own parameter, declared by managed.ManagedNode (not a config field:
# it decides how the node starts, not what it does).
AUTOSTART_HELP = ("Configure and activate at start (true); false leaves the node unconfigured until a lifecycle "
                  "manager asks (ros2 lifecycle set <node> configure, then activate).")

# How the edge receives camera frames (image_transport's names): sensor_msgs/Image on the camera
# topic, or sensor_msgs/CompressedImage on <camera topic>/compressed.
IMAGE_TRANSPORTS = ("raw", "compressed")

DEFAULT_MODEL = "default"  # resolved by tools.default_model to the embedded default model folder

_ROBOT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,127}")


def check_robot_name(robot: str) -> str:
    """A robot name is its namespace, its SROS2 enclave and the file name of its key and outcome
    journal: a ROS name token (ASCII letter, then letters, digits, _; at most 128), never a path."""
    if not isinstance(robot, str) or not _ROBOT_NAME.fullmatch(robot):
        raise ValueError(f"robot name {robot!r} is not a ROS name token (an ASCII letter, then letters, digits "
                         f"or _, at most 128): it is the robot's namespace, enclave and key file name")
    return robot


@dataclass(frozen=True)
class EdgeConfig:
    robot_id: str = param("robot_0", "Identifier of this robot; carried in every message.")
    model_path: str = param(DEFAULT_MODEL, "Hugging Face hub id or local folder of the VLM; 'default' = the "
                                        "embedded default model.")
    dtype: str = param("float32", "Model dtype on the robot: float32, float16 or bfloat16.")
    compressor_path: str = param("", "Token compressor file of the model (core/compressor.py; the server "
                                     "must hold the same one): with split_point token_compressor:<r> the robot "
                                     "ships N/r visual tokens. Empty: none.")
    device: str = param("cpu", "Torch device of the edge half, e.g. cpu or cuda:0.")
    split_point: str = param("projector", "Where the model is cut: projector, vision_block:<k> (after k "
                                       "blocks), vision_block:<k>/ln1 (after block k's layer_norm1, with "
                                       "per-token mean and std as side info), token_compressor:<r> (after "
                                       "the projector and the model's token compressor: N/r tokens; needs "
                                       "compressor_path), or none (cloud-only: the image is sent).", live=True)
    codec: str = param("raw", "Feature codec: raw (tensor bytes), vq (codebook indices); with split none: "
                           "jpeg or image.", live=True)
    codec_dtype: str = param("float32", "raw codec: float32, float16 or bfloat16 on the wire.", live=True)
    jpeg_quality: int = param(90, "jpeg codec quality 1..100.", live=True)
    codebook_path: str = param("", "vq codec: codebook file (the server must hold the same one).", live=True)
    token_stats_dtype: str = param("float16", "Split vision_block:<k>/ln1: dtype of the per-token LayerNorm "
                                           "mean and std in side_info: float16 (4 bytes a token) or float32 "
                                           "(8 bytes a token, exact to ~3e-7).", live=True)
    request_mode: str = param("prompt", "prompt: one request per prompt message, on the newest frame; "
                                     "continuous: every frame (up to max_rate_hz) with standing_prompt.")
    standing_prompt: str = param("Describe the image.", "Prompt used in continuous mode until a prompt "
                                                     "message replaces it.", live=True)
    max_rate_hz: float = param(0.0, "continuous mode: most requests per second (0 = every frame).", live=True)
    max_prompt_chars: int = param(2000, "Prompts longer than this are rejected on the robot.", live=True)
    max_new_tokens: int = param(0, "Tokens to generate per request (0 = the server's default).", live=True)
    frame_wait_s: float = param(2.0, "prompt mode: how long a prompt waits for a first camera frame.", live=True)
    max_pending_prompts: int = param(8, "Bound of the prompt queue on the robot (oldest dropped, answered "
                                     "rejected).")
    task: str = param("vqa", "vqa: prompts get text answers; action: each prompt message is an action request "
                          "(its text the instruction) answered with an ActionChunk.")
    send_proprio: bool = param(False, "task action: attach the newest robot_state (sensor_msgs/JointState "
                                   "position) to each request as proprioception.", live=True)
    request_timeout_s: float = param(30.0, "Every request gets its outcome within this (from its prompt's "
                                        "arrival) plus deadline_grace_s: the Prompt carries the deadline "
                                        "(wall clock), the server never answers after it, and the robot "
                                        "answers TIMEOUT itself once deadline_grace_s has passed too. Prompts "
                                        "still queued on the robot (PAUSE) at the deadline get TIMEOUT.", live=True)
    deadline_grace_s: float = param(1.0, "Covers an answer's transit and the offset between the robot's and "
                                      "the server's wall clocks (keep them synchronised, NTP/chrony, well "
                                      "within this).")
    max_in_flight: int = param(128, "Most published requests awaiting their outcome; beyond it new requests "
                                 "are rejected on the robot (bounds the edge's request table).")
    outcome_journal_dir: str = param("", "Where the edge writes the requests it opens and the ids of those it "
                                         "has given their outcome (<dir>/<robot_id>.outcomes, the newest 4096 "
                                         "lines kept), so that an edge process started again after a kill does "
                                         "not publish a second outcome for them from the server's recent answers, "
                                         "and ends the requests its predecessor left open. '' = "
                                         "$ROS_HOME/edge_vlm_ros/domain_<ROS_DOMAIN_ID> (~/.ros/...); 'none' = off (then a "
                                         "restarted edge may repeat an outcome its predecessor published).")
    server_lease_s: float = param(3.0, "Server liveness: a server that sends no FlowControl heartbeat for this "
                                    "long (when its message gives no lease_s) is gone: its PAUSE lapses and "
                                    "new requests get TIMEOUT 'server unavailable' at once.")
    stream_announce_s: float = param(5.0, "Feature streams (README 'Wire format'): a VisualFeatures message "
                                       "carries its stream's descriptor (split point, codec, dtype, model, "
                                       "codebook, shape) inline in the stream's first message, to every server "
                                       "instance new to this robot, and again every this many seconds (a "
                                       "server that missed it learns it within the period); the others carry "
                                       "a 4-byte id. 0: every message describes itself.")
    ask_max_goals: int = param(4, "Most Ask action goals (edge_vlm/ask) in progress at once; a goal beyond it "
                                  "ends at once with outcome REJECTED and the reason.")
    image_transport: str = param("raw", "Camera input, named as image_transport names its transports: raw "
                                        "(sensor_msgs/Image on camera/image_raw) or compressed "
                                        "(sensor_msgs/CompressedImage, JPEG or PNG, on "
                                        "camera/image_raw/compressed).")
    auth: bool = param(True, AUTH_HELP["auth"])
    auth_keys_dir: str = param("", AUTH_HELP["auth_keys_dir"])
    auth_max_age_s: float = param(10.0, AUTH_HELP["auth_max_age_s"])
    codec_ladder: list[str] = param([], "Bandwidth-adaptive codec: rungs 'name: key=value, ...', most preferred "
                                        "first, each setting one of " + ", ".join(LADDER_SETTINGS) + " (e.g. "
                                        "'fp16: split_point=projector, codec=raw, codec_dtype=float16'). Per "
                                        "request the edge uses the most preferred rung predicted to meet "
                                        "latency_target_ms on the link its answers measured; every switch is "
                                        "logged and published on edge_vlm/codec_switch. Empty: the fixed "
                                        "split_point/codec above.")
    latency_target_ms: float = param(500.0, "codec_ladder: frame -> answer time a rung must be predicted to meet.")
    ladder_dwell_s: float = param(5.0, "codec_ladder: a rung is held at least this long before stepping up, "
                                       "and the next richer rung is probed this often while below the top.")

    def rung_configs(self) -> list[tuple[str, "EdgeConfig"]]:
        """codec_ladder as (rung name, this config with the rung's settings), most preferred first."""
        from .adaptive import parse_ladder

        out = []
        for name, settings in parse_ladder(self.codec_ladder):
            typed: dict[str, Any] = {}
            for key, text in settings.items():
                if key not in LADDER_SETTINGS:
                    raise ValueError(f"codec_ladder rung {name!r}: setting {key!r} cannot change per rung; "
                                     f"allowed: {', '.join(LADDER_SETTINGS)}")
                kind = type(getattr(self, key))
                try:
                    typed[key] = kind(text)
                except ValueError as e:
                    raise ValueError(f"codec_ladder rung {name!r}: {key}={text!r} is not a {kind.__name__}") from e
            try:
                out.append((name, replace(self, codec_ladder=[], **typed)))
            except ValueError as e:
                raise ValueError(f"codec_ladder rung {name!r}: {e}") from e
        return out

    def __post_init__(self) -> None:
        check_robot_name(self.robot_id)
        sp = SplitPoint.parse(self.split_point)
        if self.ask_max_goals < 1:
            raise ValueError(f"ask_max_goals {self.ask_max_goals} < 1")
        if self.image_transport not in IMAGE_TRANSPORTS:
            raise ValueError(f"image_transport {self.image_transport!r}: expected one of {IMAGE_TRANSPORTS}")
        if self.request_mode not in ("prompt", "continuous"):
            raise ValueError(f"request_mode {self.request_mode!r}: expected 'prompt' or 'continuous'")
        # The codecs say which fields configure them and how those are checked. Imported here, not
        # at the top: the codecs need torch, and nodes that never build an EdgeConfig import this module.
        from ..codecs.registry import validate_edge_config
        from ..codecs.token_stats import STATS_DTYPES

        validate_edge_config(self.codec, sp, self)
        if self.token_stats_dtype not in STATS_DTYPES:
            raise ValueError(f"token_stats_dtype {self.token_stats_dtype!r}: expected one of {sorted(STATS_DTYPES)}")
        if self.max_rate_hz < 0 or self.frame_wait_s <= 0 or self.max_pending_prompts < 1:
            raise ValueError(f"bad rate/wait/bound: max_rate_hz={self.max_rate_hz}, frame_wait_s="
                             f"{self.frame_wait_s}, max_pending_prompts={self.max_pending_prompts}")
        if self.max_prompt_chars < 1 or self.max_new_tokens < 0:
            raise ValueError(f"max_prompt_chars={self.max_prompt_chars}, max_new_tokens={self.max_new_tokens}")
        if self.task not in ("vqa", "action"):
            raise ValueError(f"task {self.task!r}: expected 'vqa' or 'action'")
        for name in ("request_timeout_s", "server_lease_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} {v} must be finite and > 0")
        if not (math.isfinite(self.deadline_grace_s) and self.deadline_grace_s >= 0) or self.max_in_flight < 1:
            raise ValueError(f"deadline_grace_s={self.deadline_grace_s} (finite, >= 0), max_in_flight="
                             f"{self.max_in_flight} (>= 1)")
        if self.auth_max_age_s <= 0:
            raise ValueError(f"auth_max_age_s={self.auth_max_age_s} must be > 0")
        if not (math.isfinite(self.stream_announce_s) and self.stream_announce_s >= 0):
            raise ValueError(f"stream_announce_s={self.stream_announce_s} must be finite and >= 0")
        # YAML cannot type an empty list, so config files write [""]: empty entries mean nothing.
        object.__setattr__(self, "codec_ladder", [e for e in self.codec_ladder if e.strip()])
        if not (math.isfinite(self.latency_target_ms) and self.latency_target_ms > 0
                and math.isfinite(self.ladder_dwell_s) and self.ladder_dwell_s > 0):
            raise ValueError(f"latency_target_ms={self.latency_target_ms} and ladder_dwell_s={self.ladder_dwell_s} "
                             f"must be finite and > 0")
        self.rung_configs()   # every rung is a valid edge configuration


@dataclass(frozen=True)
class ServerConfig:
    server_id: str = param("server", "Identifier of this server in FlowControl messages.")
    robots: list[str] = param(["robot_0"], "Robot namespaces served; topics are /<robot>/edge_vlm/*. The "
                                        "robot_id in each message must equal its namespace.")
    model_path: str = param(DEFAULT_MODEL, "Hugging Face hub id or local folder; must be the edge's model "
                                        "(checked by fingerprint).")
    dtype: str = param("float32", "Model dtype on the server.")
    device: str = param("cpu", "Torch device, e.g. cuda:0.")
    codebook_paths: list[str] = param([], "vq codebooks this server can decode (matched by content hash).")
    compressor_path: str = param("", "Token compressor file of the model (the robots' own): the language model "
                                     "reads N/r visual tokens at every split point. Empty: none.")
    max_batch_size: int = param(8, "Most requests generated together.", live=True)
    max_batch_wait_ms: float = param(5.0, "How long the batch worker waits for more requests after the first.", live=True)
    pause_threshold: int = param(16, "Backlog (requests taken in and not yet started: inbox, unmatched, matched) at which PAUSE is published.", live=True)
    resume_threshold: int = param(4, "Backlog at which RESUME follows a PAUSE (hysteresis).", live=True)
    queue_capacity: int = param(64, "Hard bound of the matched queue; beyond it requests are rejected "
                                 "(overload). Leave room above pause_threshold for requests in flight.")
    inbox_capacity: int = param(256, "Bound of the receive inbox between callbacks and the matcher thread.")
    match_ttl_s: float = param(10.0, "A prompt or features waiting longer than this for its partner times out.")
    max_pending: int = param(256, "Most unmatched halves held; the oldest times out beyond it.")
    max_bytes_per_robot: int = param(128 * 1024 * 1024, "Most bytes of unmatched halves (decoded features or "
                                                     "images, their payloads, prompts) held for one robot; "
                                                     "a half beyond it is rejected before it is decoded.", live=True)
    max_payload_bytes: int = param(64 * 1024 * 1024, "Largest payload + side_info of one VisualFeatures "
                                                  "message; larger ones are rejected on arrival, unqueued.", live=True)
    max_image_side: int = param(4096, "Split none: largest image height or width accepted (read from the "
                                   "message and the JPEG frame header before decoding).", live=True)
    max_image_pixels: int = param(3840 * 2160, "Split none: most pixels (H x W) an image may have; checked "
                                            "before decoding (a JPEG's frame header included).", live=True)
    max_prompt_chars: int = param(2000, "Longer prompts are rejected.", live=True)
    max_prompt_tokens: int = param(256, "Prompts with more text tokens are rejected.", live=True)
    default_max_new_tokens: int = param(32, "Tokens generated when the prompt does not say.", live=True)
    max_new_tokens_limit: int = param(256, "Largest max_new_tokens a prompt may ask for.", live=True)
    ignore_eos: bool = param(False, "Always generate max_new_tokens (benchmarks, equality tests).", live=True)
    stats_path: str = param("", "If set, the server writes its counters as JSON to this file every second "
                             "and at shutdown.")
    lora_path: str = param("", "AlignedVQ LoRA folder (finetune_alignedvq's <out>/lora) merged into the language "
                            "model at start-up; empty = none. It changes answers for every request.")
    action_head_path: str = param("", "Folder of an action head (action_head_config.json + safetensors) for "
                                   "prompts with task 'action'; empty: serve vqa only.")
    heartbeat_period_s: float = param(1.0, "FlowControl is republished this often: the server's heartbeat.")
    lease_s: float = param(3.0, "Lease announced in each FlowControl: robots that hear no heartbeat for this "
                             "long treat the server as gone (its PAUSE lapses). At least 2 heartbeat periods.", live=True)
    max_pending_per_robot: int = param(64, "Most unmatched halves held for one robot; beyond it that robot's "
                                        "oldest half times out, so one robot cannot displace another's.")
    auth: bool = param(True, AUTH_HELP["auth"])
    auth_keys_dir: str = param("", AUTH_HELP["auth_keys_dir"])
    auth_max_age_s: float = param(10.0, AUTH_HELP["auth_max_age_s"])

    def __post_init__(self) -> None:
        # YAML cannot type an empty list, so config files write [""]: empty entries mean nothing.
        object.__setattr__(self, "codebook_paths", [p for p in self.codebook_paths if p])
        if not self.robots or len(set(self.robots)) != len(self.robots):
            raise ValueError(f"robots must be a non-empty list of distinct names, got {self.robots!r}")
        for r in self.robots:
            check_robot_name(r)
        if self.max_batch_size < 1 or self.max_batch_wait_ms < 0:
            raise ValueError(f"max_batch_size={self.max_batch_size}, max_batch_wait_ms={self.max_batch_wait_ms}")
        if not 0 <= self.resume_threshold < self.pause_threshold <= self.queue_capacity:
            raise ValueError("need 0 <= resume_threshold < pause_threshold <= queue_capacity, got "
                             f"{self.resume_threshold}, {self.pause_threshold}, {self.queue_capacity}")
        if self.inbox_capacity < 1 or self.max_pending < 1 or self.match_ttl_s <= 0:
            raise ValueError(f"inbox_capacity={self.inbox_capacity}, max_pending={self.max_pending}, "
                             f"match_ttl_s={self.match_ttl_s}")
        if not (math.isfinite(self.heartbeat_period_s) and self.heartbeat_period_s > 0
                and math.isfinite(self.lease_s) and self.lease_s >= 2 * self.heartbeat_period_s):
            raise ValueError(f"need heartbeat_period_s > 0 and lease_s >= 2 * heartbeat_period_s, got "
                             f"{self.heartbeat_period_s}, {self.lease_s}")
        for name in ("max_bytes_per_robot", "max_payload_bytes", "max_image_side", "max_image_pixels",
                     "max_prompt_chars", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_pending_per_robot < 1 or self.auth_max_age_s <= 0:
            raise ValueError(f"max_pending_per_robot={self.max_pending_per_robot}, "
                             f"auth_max_age_s={self.auth_max_age_s}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError(f"default_max_new_tokens={self.default_max_new_tokens} must be in "
                             f"1..max_new_tokens_limit={self.max_new_tokens_limit}")


@dataclass(frozen=True)
class ControllerConfig:
    """The controller node. With `actions` it also declares every chunks.ChunkExecutorConfig field."""

    robots: list[str] = param(["robot_0"], "Robot namespaces whose answers this controller consumes.")
    answer_log_path: str = param("", "If set, every answer is appended to this JSONL file.")
    actions: bool = param(False, "Execute action chunks: per robot, request chunks (edge task 'action'), merge "
                              "them and publish edge_vlm/action at the control rate.")
    tick_source: str = param("timer", "timer: tick every control_period_s on the wall clock (a real robot); "
                                   "robot_state: tick once per robot_state message on its stamp (lock-step sim).")
    lockstep_wait_s: float = param(0.0, "tick_source robot_state only (ignored with timer ticks: a robot's clock does "
                                        "not wait): a tick that sends a request holds its action "
                                        "until that request's chunk arrives (at most this long, wall time), so "
                                        "the lock-step simulation does not run on while the server computes: the "
                                        "split run then takes the steps the one-process policy takes, and sim-time "
                                        "latency is only inject_latency_s. 0: answer every tick at once.")
    instruction: str = param("", "Instruction sent with each action request until an Episode message gives one.")
    stats_path: str = param("", "If set, action counters and chunk latencies are written here as JSON every "
                             "second and at shutdown.")
    auth: bool = param(True, AUTH_HELP["auth"])
    auth_keys_dir: str = param("", AUTH_HELP["auth_keys_dir"])
    auth_max_age_s: float = param(10.0, AUTH_HELP["auth_max_age_s"])

    def __post_init__(self) -> None:
        if not self.robots:
            raise ValueError("robots must not be empty")
        for r in self.robots:
            check_robot_name(r)
        if self.tick_source not in ("timer", "robot_state"):
            raise ValueError(f"tick_source {self.tick_source!r}: expected 'timer' or 'robot_state'")
        if not (math.isfinite(self.lockstep_wait_s) and 0 <= self.lockstep_wait_s <= 600):
            raise ValueError(f"lockstep_wait_s {self.lockstep_wait_s} must be in [0, 600]")
        if self.auth_max_age_s <= 0:
            raise ValueError(f"auth_max_age_s={self.auth_max_age_s} must be > 0")


@dataclass(frozen=True)
class LiberoBridgeConfig:
    """The LIBERO sim bridge: which episodes it runs and how it renders and steps them."""

    robot_id: str = param("robot_0", "Robot name (its namespace); carried in logs and episode ids.")
    suite: str = param("libero_spatial", "LIBERO suite: libero_spatial, libero_object, libero_goal, libero_10, ...")
    task_ids: list[int] = param([0], "Task indices of the suite to run, in order.")
    trials: int = param(1, "Episodes per task; trial i starts from the suite's bundled init state i.")
    first_trial: int = param(0, "Index of the first init state used.")
    max_steps: int = param(220, "Control steps before an episode ends as a failure (LIBERO-spatial: 220).")
    settle_steps: int = param(10, "Steps of the safe action after each reset while objects settle (not counted).")
    image_size: int = param(128, "Camera height and width in pixels.")
    wrist_camera: bool = param(True, "Also publish the wrist camera on camera/wrist/image_raw.")
    image_flip: str = param("vertical", "The renderer's images are upside down (OpenGL origin): vertical gives the "
                                     "true camera image; rotate180 matches openpi's and LeRobot's LIBERO datasets.")
    control_period_s: float = param(0.05, "Sim time per control step (LIBERO runs at 20 Hz).")
    action_timeout_s: float = param(30.0, "Wall time to wait for the controller's action for a step; then the safe "
                                       "action is applied and counted.")
    safe_action: list[float] = param([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0], "Action applied while settling and on "
                                                                          "an action timeout (gripper open).")
    seed: int = param(7, "Simulator seed.")
    start_delay_s: float = param(0.0, "Wait this long after start-up before the first episode (subscribers).")
    wait_for_subscribers_s: float = param(120.0, "Wait up to this long for a subscriber of edge_vlm/action and of "
                                              "the camera before the first episode.")
    shutdown_when_done: bool = param(False, "Exit after the plan is done (otherwise stay up, idle).")
    stats_path: str = param("", "If set, per-episode results are written here as JSON.")

    def __post_init__(self) -> None:
        check_robot_name(self.robot_id)
        if not self.task_ids or any(t < 0 for t in self.task_ids):
            raise ValueError(f"task_ids must be a non-empty list of indices >= 0, got {self.task_ids}")
        if self.trials < 1 or self.first_trial < 0 or self.max_steps < 1 or self.settle_steps < 0:
            raise ValueError(f"trials={self.trials}, first_trial={self.first_trial}, max_steps={self.max_steps}, "
                             f"settle_steps={self.settle_steps}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size {self.image_size} outside 16..1024")
        if not (self.control_period_s > 0 and self.action_timeout_s > 0):
            raise ValueError(f"control_period_s={self.control_period_s}, action_timeout_s={self.action_timeout_s}")
        if self.image_flip not in ("vertical", "rotate180"):
            raise ValueError(f"image_flip {self.image_flip!r}: expected 'vertical' or 'rotate180'")
        object.__setattr__(self, "safe_action", [float(x) for x in self.safe_action])
        if len(self.safe_action) != 7:
            raise ValueError(f"safe_action needs 7 values (LIBERO OSC_POSE + gripper), got {self.safe_action}")


def field_descriptions(cls: type) -> dict[str, tuple[Any, str]]:
    """{name: (default, description)} of a config dataclass, for declaring ROS parameters."""
    out = {}
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = (default, f.metadata.get("description", ""))
    return out


def from_mapping(cls: type, values: dict[str, Any]):
    """Build a config from a mapping (YAML ros__parameters), rejecting unknown keys."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} parameters {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)

def _names(values: list[str]) -> list[str]:
    # YAML cannot type an empty list, so config files write [""]: empty entries mean nothing.
    return [v.strip() for v in values if v.strip()]


@dataclass(frozen=True)
class ReplayNodeConfig:
    """The rosbag replay node (replay_node.py); how the bag is scheduled (bag.io.PlaySchedule) is
    derived from this in the node."""

    bag_path: str = param("", "rosbag2 to play: a bag folder (sqlite3 or mcap, from any writer) or a .mcap "
                           "file. Required.")
    rate: float = param(1.0, "Playback rate: 1.0 real time, 2.0 twice as fast, 0.0 as fast as possible.")
    loops: int = param(1, "How many times the bag is played; 0 = forever.")
    remaps: list[str] = param([], "Topic remaps 'from:=to' (bag topic -> published topic), as `ros2 bag play "
                               "--remap`; e.g. /cam/color/image_raw:=/camera/image_raw.")
    topics: list[str] = param([], "Bag topics to play (empty = every sensor_msgs/Image, CompressedImage and "
                               "std_msgs/String topic).")
    robots: list[str] = param([], "Robot namespaces to replay into: each (remapped) bag topic /x is published "
                               "as /<robot>/x for every robot. Empty = publish the topics as they are.")
    publish_clock: bool = param(False, "Publish /clock (rosgraph_msgs/Clock) with bag time, for use_sim_time.")
    clock_hz: float = param(100.0, "Rate of /clock messages when publish_clock is set.")
    preload: bool = param(False, "Decode the whole bag into memory before the first message (no disk or "
                              "decode time inside the schedule).")
    preload_limit_mb: int = param(2048, "Refuse to preload more decoded bytes than this many MB.")
    pause_on_flow_control: bool = param(True, "Subscribe each robot's edge_vlm/flow_control and hold the "
                                           "replay while any server says PAUSE.")
    restamp: bool = param(False, "Set header.stamp of replayed images to the publish time (end-to-end latency "
                              "from the replay); otherwise the bag's stamp, shifted by the loop span.")
    wait_for_subscribers_s: float = param(10.0, "Before the first message, wait up to this long until each "
                                             "robot has a subscriber on one of its image topics (its edge "
                                             "reads one: raw or compressed), on one of its prompt topics "
                                             "when the bag holds prompts, and, with "
                                             "pause_on_flow_control, a flow state from every robot's "
                                             "server; the replay starts as soon as they are there. 0 = do "
                                             "not wait.")
    match_settle_s: float = param(0.5, "Once every robot's subscribers are there, wait this long before the "
                                       "first message: DDS discovery is two-sided, and a subscriber the "
                                       "replay has matched drops what arrives before it has matched the "
                                       "replay's publisher in turn.")
    start_delay_s: float = param(0.0, "Extra wait before the first message.")
    shutdown_when_done: bool = param(True, "Exit the node when the replay has ended (as `ros2 bag play`).")
    stats_path: str = param("", "If set, the replay statistics are written as JSON to this file at the end.")

    def __post_init__(self) -> None:
        for name in ("remaps", "topics", "robots"):
            object.__setattr__(self, name, _names(list(getattr(self, name))))
        if not self.bag_path:
            raise ValueError("bag_path is required: the rosbag2 folder or .mcap file to play, got ''")
        if not self.rate >= 0.0:
            raise ValueError(f"rate must be >= 0 (0: as fast as possible), got {self.rate}")
        if self.loops < 0:
            raise ValueError(f"loops must be >= 0 (0: forever), got {self.loops}")
        for item in self.remaps:
            src, sep, dst = item.partition(":=")
            if not sep or not src.strip() or not dst.strip():
                raise ValueError(f"bad remap {item!r}: expected 'from_topic:=to_topic'")
        if len(set(self.robots)) != len(self.robots):
            raise ValueError(f"robots must be distinct, got {self.robots!r}")
        for r in self.robots:
            check_robot_name(r)
        if self.publish_clock and not self.clock_hz > 0:
            raise ValueError(f"clock_hz must be > 0 with publish_clock, got {self.clock_hz}")
        if self.preload_limit_mb < 1:
            raise ValueError(f"preload_limit_mb must be >= 1, got {self.preload_limit_mb}")
        if not (self.wait_for_subscribers_s >= 0 and self.start_delay_s >= 0 and self.match_settle_s >= 0):
            raise ValueError(f"wait_for_subscribers_s={self.wait_for_subscribers_s}, match_settle_s="
                             f"{self.match_settle_s} and start_delay_s={self.start_delay_s} must be >= 0")

    def remap_dict(self) -> dict[str, str]:
        out = {}
        for item in self.remaps:
            src, _, dst = item.partition(":=")
            out[src.strip()] = dst.strip()
        return out

    def output_topics(self, topic: str) -> list[str]:
        """Where a bag topic is published: remapped, then put under each robot's namespace."""
        t = self.remap_dict().get(topic, topic)
        if not self.robots:
            return [t]
        return [f"/{r}/{t.lstrip('/')}" for r in self.robots]
