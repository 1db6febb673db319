"""SIGHUP: what a new configuration changes, worked out before anything is touched (pure).

A reload applies devices, pipeline rules (clean, alert rules) and forward destinations without
restarting the broker, so connected MQTT clients stay connected. What cannot change while running
(the broker's address, the data directory, the topic taxonomy, the site and gateway id: they are in
every stored row and every topic) is reported and kept as it was until the next restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import GatewayConfig

# (field, why it needs a restart)
_FIXED = (
    ("broker", "the broker's listeners"),
    ("storage", "the data directory"),
    ("topics", "the topic taxonomy"),
    ("site", "the site (a level of every topic)"),
    ("gateway_id", "the gateway id"),
    ("ble", "the BLE backend"),
    ("dialects", "the foreign dialects (what the gateway subscribes to and journals)"),
)


FIXED_FIELDS = tuple(name for name, _ in _FIXED)


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    devices_added: tuple[str, ...]
    devices_removed: tuple[str, ...]
    devices_changed: tuple[str, ...]
    destinations_added: tuple[str, ...]
    destinations_removed: tuple[str, ...]
    destinations_changed: tuple[str, ...]
    pipeline_changed: bool
    needs_restart: tuple[str, ...]  # "broker (the broker's listeners)", ...

    @property
    def changes(self) -> bool:
        return bool(
            self.devices_added or self.devices_removed or self.devices_changed or self.destinations_added
            or self.destinations_removed or self.destinations_changed or self.pipeline_changed
        )

    def summary(self) -> str:
        parts = []
        for label, names in (
            ("devices added", self.devices_added), ("devices removed", self.devices_removed),
            ("devices changed", self.devices_changed), ("destinations added", self.destinations_added),
            ("destinations removed", self.destinations_removed),
            ("destinations changed", self.destinations_changed),
        ):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        if self.pipeline_changed:
            parts.append("pipeline rules changed")
        return "; ".join(parts) or "nothing changed"


def _diff(old: dict[str, object], new: dict[str, object]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    added = tuple(sorted(new.keys() - old.keys()))
    removed = tuple(sorted(old.keys() - new.keys()))
    changed = tuple(sorted(k for k in old.keys() & new.keys() if old[k] != new[k]))
    return added, removed, changed


def plan_reload(old: GatewayConfig, new: GatewayConfig) -> ReloadPlan:
    dev_added, dev_removed, dev_changed = _diff({d.id: d for d in old.devices}, {d.id: d for d in new.devices})
    dest_added, dest_removed, dest_changed = _diff({f.name: f for f in old.forward}, {f.name: f for f in new.forward})
    restart = tuple(
        f"{name} ({why})" for name, why in _FIXED if getattr(old, name) != getattr(new, name)
    )
    rules_old = {k: v for k, v in old.model_dump().items() if k in _RULE_FIELDS}
    rules_new = {k: v for k, v in new.model_dump().items() if k in _RULE_FIELDS}
    return ReloadPlan(
        dev_added, dev_removed, dev_changed, dest_added, dest_removed, dest_changed,
        pipeline_changed=rules_old != rules_new, needs_restart=restart,
    )


# Top-level fields a reload applies to the pipeline (others may add theirs: alert rules, catalog).
_RULE_FIELDS = frozenset({"pipeline", "rules", "catalog"})
