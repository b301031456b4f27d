"""Tests for lmforge.align."""
