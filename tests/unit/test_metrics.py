"""Metric labels stay bounded: error types outside the HTTP table and unknown values count as `other`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import REGISTRY

import metrics
from api.errors import count_error, error_response
from api.streaming import server_sent_events
from domain.errors import ERROR_KINDS, GenerationTimeoutError
from tests.conftest import ROOT


def errors_counted(error_type: str) -> float:
    return REGISTRY.get_sample_value("ai_model_errors_total", {"error_type": error_type}) or 0.0


def test_an_allowed_value_is_its_own_label_and_anything_else_is_other() -> None:
    assert metrics.bounded("model_not_found", {"model_not_found"}) == "model_not_found"
    assert metrics.bounded("model_not_found ", {"model_not_found"}) == metrics.OTHER
    assert metrics.bounded("", {"model_not_found"}) == metrics.OTHER


@pytest.mark.parametrize("error_type", sorted(ERROR_KINDS))
def test_every_domain_error_type_is_counted_under_its_own_label(error_type: str) -> None:
    before = errors_counted(error_type)
    count_error(error_type)
    assert errors_counted(error_type) == before + 1


@pytest.mark.parametrize("error_type", ["no_such_error", "Model_Not_Found", "<script>", "x" * 10_000])
def test_an_unknown_error_type_is_counted_as_other(error_type: str) -> None:
    before = errors_counted(metrics.OTHER)
    count_error(error_type)
    assert errors_counted(metrics.OTHER) == before + 1
    assert REGISTRY.get_sample_value("ai_model_errors_total", {"error_type": error_type}) is None


def test_every_error_response_is_counted_once() -> None:
    before = errors_counted("overloaded")
    assert error_response("busy", "overloaded").status_code == 429
    assert errors_counted("overloaded") == before + 1


def test_every_known_error_type_has_a_series_at_0_before_it_happens() -> None:
    code = """
        from prometheus_client import REGISTRY
        from api.errors import STATUS_BY_ERROR_TYPE
        series = {kind: {"error_type": kind} for kind in STATUS_BY_ERROR_TYPE}
        counts = {kind: REGISTRY.get_sample_value("ai_model_errors_total", labels) for kind, labels in series.items()}
        assert set(counts.values()) == {0.0}, counts
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cache_lookups_are_counted_as_hits_or_misses() -> None:
    def counted(result: str) -> float:
        return REGISTRY.get_sample_value("ai_model_response_cache_total", {"result": result})

    hits, misses = counted("hit"), counted("miss")
    metrics.count_cache_lookup(hit=True)
    metrics.count_cache_lookup(hit=False)
    metrics.count_cache_lookup(hit=False)
    assert (counted("hit"), counted("miss")) == (hits + 1, misses + 2)


def test_an_error_that_ends_a_stream_is_counted_under_its_type() -> None:
    async def tokens_then_timeout():
        yield " Paris"
        raise GenerationTimeoutError("generation passed MAX_GENERATION_TIME=30s and was stopped")

    async def read_all() -> list[str]:
        return [chunk async for chunk in server_sent_events("The", tokens_then_timeout(), final=dict)]

    before = errors_counted("generation_timeout")
    chunks = asyncio.run(read_all())
    assert '"error_type": "generation_timeout"' in chunks[-1]
    assert errors_counted("generation_timeout") == before + 1


def test_memory_is_recorded_per_cuda_device_given() -> None:
    metrics.record_memory(rss_bytes=300, vms_bytes=900, gpu={"cuda:0": (10, 20), "cuda:1": (30, 40)})
    assert REGISTRY.get_sample_value("ai_model_engine_rss_bytes") == 300
    assert REGISTRY.get_sample_value("ai_model_engine_vms_bytes") == 900
    for device, (allocated, reserved) in {"cuda:0": (10, 20), "cuda:1": (30, 40)}.items():
        assert REGISTRY.get_sample_value("ai_model_gpu_memory_allocated_bytes", {"device": device}) == allocated
        assert REGISTRY.get_sample_value("ai_model_gpu_memory_reserved_bytes", {"device": device}) == reserved
