"""Integration fixtures shared by the Ray stages' tests: one local Ray per session, one tiny world per session.

``ray_session`` starts Ray through ``pipelines.ray_runtime.ensure_ray`` (loopback only, the per-run auth token
that ``configure_environment`` sets up in tests/conftest.py before anything imports ray), with 2 CPUs and the
dashboard (Ray Train's controller watches itself through the state API the dashboard serves), and shuts it down
at the end of the session. A test module that started its own Ray and shut it down is fine: the fixture starts
one again when asked.

``tiny_world`` is a run root with the tiny config's world generated and ingested by the real ``capfilt synth``
and ``capfilt ingest`` commands (about 20 s, once per session). Tests must treat it as read-only: a test that
writes stage outputs links ``world/`` and ``ingest/`` into a root of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from integration_helpers import TINY, capfilt


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    import ray

    from pipelines.ray_runtime import ensure_ray

    started = not ray.is_initialized()
    where = ensure_ray(num_cpus=2, dashboard=True)
    try:
        yield where
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("tiny-world") / "run")
    for stage in ("synth", "ingest"):
        proc, seconds = capfilt(stage, "--config", TINY, "--root", root)
        assert proc.returncode == 0, f"capfilt {stage} failed after {seconds:.0f}s:\n{proc.stderr[-3000:]}"
    return root
