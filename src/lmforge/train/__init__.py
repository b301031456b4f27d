"""Pretraining: loop, schedules, checkpoints, metrics."""
