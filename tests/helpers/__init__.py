"""Helpers shared by several test files (imported explicitly: ``from tests.helpers.runs import tiny``)."""
