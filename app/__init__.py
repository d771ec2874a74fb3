"""Shallot app package."""
