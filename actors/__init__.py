"""The Ray actors: the generate stage's actor, the target and drafter-server actors of the disaggregated pools, their
pool manager and controller, and the job's Prometheus metrics. The engine they host is engine/ (no Ray)."""
