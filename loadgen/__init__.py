"""Load generation: trace-driven and synthetic arrivals, prompts from real text, open- and
closed-loop Locust runs with per-token measurement, and the reports (DESIGN.md section 2,
``loadgen/``).

Modules: ``arrivals`` (when), ``prompts`` (what), ``schedule`` (to whom), ``pacer`` (open- and
closed-loop timing), ``locustfile`` (the users, reading streams with ``disco.scheduler.wire``;
runs only inside Locust's own process), ``runner`` (starts that process), ``records``/``report``
(results), ``html_report`` (DIR/report.html, one page per run), ``replay`` (one run end to
end), ``slo`` (per-request SLO, attainment, goodput), ``phases`` (warm-up, measured window,
cool-down), ``sweep`` (one run per point of offered load: rows and curves), ``mock_server`` (a
loopback SSE server for tests).
The simulator-vs-live comparison is the demo's (``disco.cluster.commands.demo``).
Nothing here imports Ray, and nothing but ``locustfile`` imports Locust.
"""
