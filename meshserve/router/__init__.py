"""Data-parallel router: one OpenAI-compatible endpoint in front of independent engine replicas.

`meshserve router --backend URL ...` balances requests over replicas (least outstanding, prefix affinity
or round robin), checks their health, retries requests that failed before their first byte, degrades to a
fallback pool, and exports a queue-depth autoscaling signal. `meshserve serve --data-parallel-size N`
starts N replicas plus this router (see launcher.py).
"""
