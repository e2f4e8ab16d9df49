"""The environment Ray and Prefect read when they start, set by the entry points that start them, never at import.

``configure_environment`` is called first thing by ``capfilt`` (``flows.cli.main``) and by the flow ``capfilt``
(``flows.bootstrap.capfilt``, which is also what a deployment's worker runs); ``flows.deploy.deploy`` calls
``configure_prefect_environment``. Values the user set always win.

Without ``PREFECT_API_URL`` a run starts Prefect's in-process server, whose telemetry service phones Prefect's
servers by default: an outbound call from a data cluster, and an ERROR line in every run's log where there is no
internet. It is off unless the user turns it on. The server is a subprocess that inherits this process's
environment when it starts, i.e. when the first flow run begins: set the variable before that.
"""

from __future__ import annotations

import os

from pipelines.ray_runtime import configure_environment as configure_ray_environment


def configure_prefect_environment() -> None:
    """Prefect's settings before Prefect starts its in-process server (or, better, before ``import prefect``)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def configure_environment() -> None:
    """Ray's (``pipelines.ray_runtime.configure_environment``) and Prefect's settings, before either starts."""
    configure_prefect_environment()
    configure_ray_environment()
