"""``capfilt deploy --pool P``: deployment ``bootstrap`` of flow ``capfilt`` on a process work pool.

The deployment is defined once, in ``infra/prefect/prefect.yaml`` (also usable with ``prefect deploy``); this
registers it with the Prefect API the environment points at (``PREFECT_API_URL``), creating the process pool
when it is missing. The flow runs from this checkout's directory, so a process worker started where the
checkout is installed (``prefect worker start --pool P``) executes it; then
``prefect deployment run capfilt/bootstrap -p config=... -p root=...`` starts a run, and
``-p mode=curate`` one that curates with the config's given checkpoints instead of training (the flow's
``mode`` parameter; unset, the config's ``flow.mode``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from flows.runtime import configure_prefect_environment

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "infra" / "prefect" / "prefect.yaml"


def deployment_spec() -> dict:
    """The ``bootstrap`` entry of infra/prefect/prefect.yaml."""
    (spec,) = [d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == "bootstrap"]
    return spec


async def _ensure_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return
        if pool.type != "process":
            raise ValueError(f"work pool {name!r} exists with type {pool.type!r}; capfilt deploys to a process pool")


def deploy(pool: str | None = None) -> str:
    configure_prefect_environment()  # before Prefect starts (an in-process server when PREFECT_API_URL is unset)
    from prefect import flow

    spec = deployment_spec()
    pool = pool or spec["work_pool"]["name"]
    asyncio.run(_ensure_pool(pool))
    source_flow = flow.from_source(source=str(REPO), entrypoint=spec["entrypoint"])
    deployment_id = source_flow.deploy(
        name=spec["name"],
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps=False,
        parameters=spec.get("parameters", {}),
        description=spec.get("description"),
        tags=spec.get("tags"),
        job_variables=spec["work_pool"].get("job_variables", {}),
    )
    return f"deployment {source_flow.name}/{spec['name']} ({deployment_id}) on work pool {pool!r}"
