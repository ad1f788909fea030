"""Our own MuJoCo tabletop benchmark: scene, environment, scripted expert (no ROS)."""
