"""Sizes a user types are bounded by what the machine holds: one sentence before anything that large is
allocated, never the kernel's out-of-memory kill (exit 137, no message)."""

from __future__ import annotations

from gptcli import machine


def test_available_memory_is_known_on_linux():
    free = machine.available_memory()
    assert free is None or 0 < free < 2**50
