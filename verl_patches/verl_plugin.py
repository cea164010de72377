"""Imported by verl on `import verl` (entry point group `verl.plugins`), in every Ray process.

verl only logs plugin import failures at DEBUG level, so tests assert in a fresh interpreter
that each registration below really happened (tests/test_plugin_registration.py).
"""

from verl_patches.registrations import register_all

register_all()
