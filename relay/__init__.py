"""Shallot relay package."""
