"""Evaluation helpers shared by the evaluate stage and the eval commands: statistics, reports."""
