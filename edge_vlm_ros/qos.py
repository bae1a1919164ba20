"""Quality of service for every topic, decided once here.

- camera frames: best effort, depth 1 (the sensor-data choice: a late frame is worthless and the
  edge keeps only the newest one anyway);
- prompts, features and answers: reliable, small depth (each belongs to a request that must end
  in exactly one outcome; the depth bounds memory, back-pressure keeps it from being needed);
- flow control: reliable + transient local, depth 1 (a robot that starts late learns PAUSE at once).
"""

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

CAMERA = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                    durability=DurabilityPolicy.VOLATILE)
USER_PROMPT = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
REQUEST = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
FEATURES = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=4, reliability=ReliabilityPolicy.RELIABLE)
ANSWER = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=20, reliability=ReliabilityPolicy.RELIABLE)
FLOW = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                  durability=DurabilityPolicy.TRANSIENT_LOCAL)
