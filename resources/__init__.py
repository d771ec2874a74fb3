"""Shallot resources package."""
