"""Quality of service for every topic, decided once here.

- camera frames: best effort, depth 1 (the sensor-data choice: a late frame is worthless and the
  edge keeps only the newest one anyway);
- prompts, features and answers: reliable, small depth (each belongs to a request that must end
  in exactly one outcome; the depth bounds memory, back-pressure keeps it from being needed);
- flow control: reliable + transient local, depth 1 (a robot that starts late learns PAUSE at once).
- cancels: reliable, small depth, volatile (like requests: one per request taken back; a server that
  starts later never held the request);
- action chunks: reliable, small depth (like answers: one per request, never silently lost);
- the server's answers and chunks to the robot's edge: reliable + transient local, depth 32 (an edge
  process started again after a kill recovers what the server sent while it was down);
- executed actions and robot state: reliable, depth 1-ish: in the lock-step sim every step waits for
  exactly one action, so losing one would stall a step until its timeout (on a real robot the newest
  wins anyway);
- episodes: reliable + transient local (a node that starts late learns the current episode),
  depth 10 so an evaluator does not miss an end event that follows a start quickly.
- codec switches (the edge's codec ladder): reliable + transient local, depth 10 (a monitor that starts
  late learns the current rung and the last few switches);
- /diagnostics: reliable, depth 10, volatile, as diagnostic_updater publishes it (a status is
  republished every second; a late monitor waits for the next).
The camera profile serves both camera inputs (sensor_msgs/Image and, with image_transport
compressed, sensor_msgs/CompressedImage on <camera>/compressed).
"""

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

CAMERA = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                    durability=DurabilityPolicy.VOLATILE)
USER_PROMPT = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
REQUEST = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
# Depth 8: a burst of other parties' (unauthenticated) samples must not push a robot's genuine
# features out of the server's reader history before its callback drops them.
FEATURES = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=8, reliability=ReliabilityPolicy.RELIABLE)
ANSWER = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=20, reliability=ReliabilityPolicy.RELIABLE)
# The server's outcomes to a robot's edge: transient local, so an edge process started again after a
# kill still gets the outcomes the server sent while it was down (its journal drops the ones it had
# already published); the depth bounds what a restarted edge can recover.
SERVER_OUTCOME = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=32, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)
FLOW = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                  durability=DurabilityPolicy.TRANSIENT_LOCAL)
CANCEL = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
ACTION_CHUNK = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
ACTION = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
ROBOT_STATE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
DIAGNOSTICS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
EPISODE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
CODEC_SWITCH = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
