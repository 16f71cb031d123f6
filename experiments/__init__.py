"""Judging and promoting champion/challenger experiments."""
