"""Stage 1, calibrate: calibration text, and the statistics each expert leaves on it."""
