"""Topic names. Robot-side names are relative, so each robot's nodes live in its own namespace;
the server addresses robot r as /<r>/edge_vlm/<name>."""

CAMERA = "camera/image_raw"          # sensor_msgs/Image, input of the edge node (image_transport raw)
CAMERA_COMPRESSED = CAMERA + "/compressed"  # sensor_msgs/CompressedImage (image_transport compressed)
DIAGNOSTICS = "/diagnostics"         # diagnostic_msgs/DiagnosticArray, every node's health, ~1 Hz
PROMPT_TEXT = "edge_vlm/prompt_text"  # std_msgs/String, a user's or a task's prompt for this robot
PROMPT = "edge_vlm/prompt"           # edge_vlm_ros/Prompt, edge -> server
FEATURES = "edge_vlm/features"       # edge_vlm_ros/VisualFeatures, edge -> server
ANSWER = "edge_vlm/answer"           # edge_vlm_ros/Answer, edge -> robot users: each request's one outcome
SERVER_ANSWER = "edge_vlm/server_answer"  # edge_vlm_ros/Answer, server -> edge (relayed on ANSWER if still awaited)
FLOW = "edge_vlm/flow_control"       # edge_vlm_ros/FlowControl, server -> robot
ACTION_CHUNK = "edge_vlm/action_chunk"  # edge_vlm_ros/ActionChunk, edge -> controller (task "action"): one outcome
SERVER_ACTION_CHUNK = "edge_vlm/server_action_chunk"  # edge_vlm_ros/ActionChunk, server -> edge (relayed likewise)
ACTION = "edge_vlm/action"           # edge_vlm_ros/RobotAction, controller -> robot/sim, one per control tick
ROBOT_STATE = "robot_state"          # sensor_msgs/JointState, robot/sim -> edge (proprio) and controller (ticks)
WRIST_CAMERA = "camera/wrist/image_raw"  # sensor_msgs/Image, the sim's wrist camera
CODEC_SWITCH = "edge_vlm/codec_switch"  # std_msgs/String JSON, edge -> anyone: its codec ladder's rung changes
EPISODE = "sim/episode"              # edge_vlm_ros/Episode, sim bridge -> edge, controller, evaluation
CANCEL = "edge_vlm/cancel"         # edge_vlm_ros/Cancel, robot -> server: drop a request already sent
ASK = "edge_vlm/ask"                 # edge_vlm_ros/action/Ask, served by the edge node: one question, its answer


def for_robot(robot: str, name: str) -> str:
    return f"/{robot}/{name}"
