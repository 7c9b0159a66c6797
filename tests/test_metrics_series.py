"""The allocation series kept at hand follow the pools a reload adds and removes."""

from __future__ import annotations

from necrod.daemon.metrics import Metrics


def _count(m: Metrics, pool: str) -> float | None:
    for family in m.registry.collect():
        for sample in family.samples:
            if sample.name == "necrod_allocations_total" and sample.labels == {"pool": pool}:
                return sample.value
    return None


def test_a_pool_removed_and_configured_again_counts_from_zero_in_a_live_series() -> None:
    m = Metrics()
    m.track(["p"], [])
    m.allocated("p", 0.001)
    m.allocated("p", 0.002)
    assert _count(m, "p") == 2
    m.track([], [])
    assert _count(m, "p") is None
    m.track(["p"], [])
    assert _count(m, "p") == 0
    m.allocated("p", 0.001)
    assert _count(m, "p") == 1
    assert 'necrod_allocation_seconds_count{pool="p"} 1.0' in m.render()
