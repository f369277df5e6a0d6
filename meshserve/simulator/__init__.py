"""A discrete-event simulator of a serving fleet (`meshserve simulate`, issue 28).

Each replica runs the engine's real Scheduler (block manager, prefix cache, preemption, chunked prefill, the
SLO scheduling policy) on a simulated clock; a step's duration comes from the engine's step-time model,
calibrated on our own step traces, instead of a forward pass. A router policy from meshserve/router spreads
an arrival trace over the replicas.

The fast replica model (fast_replica.py, --replica-model fast) makes the scheduler's decisions for the common
configuration on counters, with decode steps in closed form between events (decode_segment.py), behind its own
event loop (fast_fleet.py, the router's least-outstanding choice from least_outstanding.py); the scheduler path
stays as the reference it is tested against (tests/simulator/test_fast_replica.py).

trace.py (arrivals), step_cost.py (step durations), replica.py (one engine), pipeline.py (one engine of pipeline
stages: steps in flight over stages in series, the host feeding them), light.py (its sequences and blocks
as counts), frontend.py (each replica's API process as a CPU queue), fleet.py (the event loop and the router),
autoscale.py (replicas on the queue-depth rule), metrics.py (latencies, goodput, cost), config.py (what
is simulated), search.py (layouts ranked by goodput per dollar), cli.py (the command), validation.py (replays
of measured runs).
"""
