"""A discrete-event simulator of a serving fleet (`meshserve simulate`, issue 28).

Each replica runs the engine's real Scheduler (block manager, prefix cache, preemption, chunked prefill, the
SLO scheduling policy) on a simulated clock; a step's duration comes from the engine's step-time model,
calibrated on our own step traces, instead of a forward pass. A router policy from meshserve/router spreads
an arrival trace over the replicas.

trace.py (arrivals), step_cost.py (step durations), replica.py (one engine), fleet.py (the event loop and the
router), metrics.py (latencies, goodput, cost), config.py (what is simulated), cli.py (the command),
validation.py (replays of measured runs).
"""
