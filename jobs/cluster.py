"""Where Ray runs: an embedded local Ray, or an existing cluster that should check tokens.

Ray 2.60 turns token authentication on for the local Ray that `ray.init()` starts, but a cluster
started with `ray start` without a token runs with it off, and then anyone who reaches its ports
can run code on it. Connecting to such a cluster works silently, so this module says so.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request

import ray

log = logging.getLogger("lorafleet.cluster")
AUTH_OFF = (
    "the Ray cluster at {url} runs with token authentication OFF: anyone who can reach its ports can run code on it. "
    "Restart it with a token: `ray get-auth-token --generate`, then `ray start --head` (README, 'Run on a cluster')"
)


def connect(address: str | None) -> None:
    """`ray.init` once per process: `address`, else RAY_ADDRESS, else an embedded local Ray."""
    if ray.is_initialized():
        return
    context = ray.init(address=address)
    if address or os.environ.get("RAY_ADDRESS"):
        warn_if_auth_off(context.dashboard_url)


def auth_mode(dashboard_url: str) -> str | None:
    """The cluster's own answer ("token" or "disabled"), from the dashboard route Ray serves without a token."""
    url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/authentication_mode", timeout=10) as response:
            return json.load(response).get("authentication_mode")
    except (urllib.error.URLError, OSError, ValueError):
        return None  # no dashboard (include_dashboard=False) or an older Ray: nothing to say


def warn_if_auth_off(dashboard_url: str | None) -> bool:
    if dashboard_url and auth_mode(dashboard_url) == "disabled":
        log.warning(AUTH_OFF.format(url=dashboard_url))
        return True
    return False
