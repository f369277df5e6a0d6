"""Capacity planner: memory, parallel layout, speed and cost predictions (arithmetic only; never imports torch)."""
