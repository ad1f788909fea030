"""Console tools: offline profiling and calibration, plots, the demo."""
