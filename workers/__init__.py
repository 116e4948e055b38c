"""Ray workers: score candidates of one job in parallel from its shared calibration statistics."""
