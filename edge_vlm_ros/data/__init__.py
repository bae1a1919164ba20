"""Data sets the reference model is trained and measured on (ROS-free)."""
