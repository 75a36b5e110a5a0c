"""Load generation: trace-driven and synthetic arrivals, prompts from real text, open-loop Locust
replay with per-token measurement, and the reports (DESIGN.md section 2, ``loadgen/``).

Modules: ``arrivals`` (when), ``prompts`` (what), ``schedule`` (to whom), ``pacer`` (open-loop
timing), ``locustfile`` (the users, reading streams with ``disco.scheduler.wire``; runs only
inside Locust's own process), ``runner`` (starts that process), ``records``/``report``
(results), ``replay`` (one run end to end), ``mock_server`` (a loopback SSE server for tests).
The simulator-vs-live comparison is the demo's (``disco.cluster.commands.demo``).
Nothing here imports Ray, and nothing but ``locustfile`` imports Locust.
"""
