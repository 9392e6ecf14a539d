"""Calibration: activation range observers and the hook-driven loop that feeds them."""
