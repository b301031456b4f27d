"""Evaluation harness: bits-per-byte, multiple choice, math, code (pass@k), needle-in-a-haystack."""
