"""Flywheel: close the feedback-to-release loop of a conversational model."""

__version__ = "0.1.0"
