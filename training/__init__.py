"""Accelerate training entry points (PMD teacher / student, cascaded MIL): planned, see the README table."""
