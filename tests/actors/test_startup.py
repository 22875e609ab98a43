"""metrics.json's startup record sums what the actors' compiled steps cost (actors/startup.py)."""
from __future__ import annotations

from actors.startup import phases


def test_phases_sum_the_actors_compiled_steps():
    actors = [{"compiled": {"seconds": 2.0, "buckets": 3}}, {"compiled": None}, {"compiled": {"seconds": 1.5, "buckets": 2}}]
    assert phases(0.0, None, None, None, actors)["compiled"] == {"seconds": 3.5, "buckets": 5}
    assert phases(0.0, None, None, None, [{"compiled": None}, {}])["compiled"] is None
