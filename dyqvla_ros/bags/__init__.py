"""rosbag2 tools: synthetic episodes, replay, recording, reading (via ``rosbags``).

Reading and writing need no ROS 2 install (``rosbags``); replay and record use rclpy.
"""
