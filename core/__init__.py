"""Shared leaf package: label order, the face result type and the one settings object.

Everything may import `core`; `core` imports nothing else of ours.
"""
