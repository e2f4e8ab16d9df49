"""Prefect flows over the pipeline stages.

Without ``PREFECT_API_URL`` a run starts Prefect's in-process server, whose telemetry service phones Prefect's
servers by default: an outbound call from a data cluster, and an ERROR line in every run's log where there is no
internet. It is off unless the user turns it on.
"""
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
