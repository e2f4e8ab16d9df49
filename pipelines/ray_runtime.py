"""Where Ray work runs: the cluster named by ``RAY_ADDRESS``, or a local Ray that binds only 127.0.0.1.

Reaching a real cluster is an explicit setting (``RAY_ADDRESS``, with ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` as
that cluster needs); without it a new local cluster starts (``address="local"``, so a stale
``ray_current_cluster`` file never makes us join somebody else's). The auth mode is always explicit: Ray turns
token auth on by itself when ``~/.ray/auth_token`` exists, head and driver must agree, and Ray reads these
variables once, when it is first imported. So ``configure_environment`` must run before the process's first
``import ray``: ``ensure_ray`` calls it, as do the entry points (``flows.cli.main``, the flow ``capfilt``) and every
other function here that imports Ray; importing ``pipelines`` sets nothing.
"""

from __future__ import annotations

import logging
import os
import secrets

log = logging.getLogger(__name__)


def configure_environment() -> None:
    """Set Ray's environment before ``import ray``; values the user set win."""
    if os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        return
    # Without this Ray advertises the machine's own address and listens on all interfaces.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        # A per-run token for the local cluster, inherited by every process it starts; nothing written to ~/.ray.
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))


def ensure_ray(num_cpus: int | None = None, dashboard: bool | None = None) -> str:
    """Initialise Ray once per process; returns a description of where it runs."""
    configure_environment()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        where = f"Ray cluster at {address}"
    else:
        if dashboard is None:
            dashboard = os.environ.get("CAPFILT_RAY_DASHBOARD", "0") == "1"
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
        where = "local Ray on 127.0.0.1"
    log.info("using %s (%s)", where, ray.get_runtime_context().gcs_address)
    return where
