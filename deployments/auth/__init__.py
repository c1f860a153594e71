"""API keys and tenancy: keys by hash with their models (`keys`), and per-key rate limits shared by the router
replicas through one Ray actor (`limits`). No HTTP here: deployments.api.limits applies them to requests."""

from __future__ import annotations

from typing import Any

from deployments.auth.keys import (
    ApiKeyConfig,
    KeyRing,
    Tenant,
    check_model,
    current_tenant,
    generate_key,
    key_entry_yaml,
    key_sha256,
    may_use,
)

__all__ = [
    "Admission",
    "ApiKeyConfig",
    "KeyRing",
    "QuotaStore",
    "QuotaUnavailableError",
    "Quotas",
    "Tenant",
    "bind_request",
    "charge",
    "check_model",
    "current_tenant",
    "generate_key",
    "key_entry_yaml",
    "key_sha256",
    "may_use",
    "store_name",
]

# Imported on first use: deployments.config imports the key schema, and the limits pull in Ray and the metrics.
_FROM_LIMITS = {"Admission", "QuotaStore", "QuotaUnavailableError", "Quotas", "bind_request", "charge", "store_name"}


def __getattr__(name: str) -> Any:
    if name in _FROM_LIMITS:
        from deployments.auth import limits

        return getattr(limits, name)
    raise AttributeError(f"module 'deployments.auth' has no attribute '{name}'")
