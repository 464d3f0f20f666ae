"""Batch runs: inputs, pairing, identity, the runner, explain and calibration."""
