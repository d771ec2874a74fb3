"""Shallot exit package."""
