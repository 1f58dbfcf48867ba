"""Feedback data: the raw store and its rows, ingest and its batch checks, erase."""
