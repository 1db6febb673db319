"""The gateway's typed configuration: one model per section of the file, every default in its section.

A TOML file is parsed into :class:`GatewayConfig`. Problems come back as one line each,
``field.path: reason``, through :class:`~gateway.errors.ConfigError`.

The sections live in their own modules: ``[broker]`` :mod:`.broker`, ``[storage]`` :mod:`.storage`,
``[pipeline]`` and ``[topics]`` :mod:`.pipeline`, ``[[devices]]`` and ``[ble]`` :mod:`.devices`,
``[[rules]]`` :mod:`.rules`, ``[catalog]`` :mod:`.catalog`, ``[http]`` :mod:`.http`, ``[logging]``
:mod:`.logs`. Each ``[[forward]]`` destination type owns its settings model, in its package under
:mod:`gateway.forward` (registered in :mod:`gateway.forward.registry`). Every name is re-exported here.
"""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from gateway.config.broker import Access, AclRule, BrokerListener, BrokerSettings, BrokerTls
from gateway.config.catalog import CatalogApplication, CatalogField, CatalogSettings, CatalogType, CatalogValue
from gateway.config.devices import (
    BAUDRATES,
    DEFAULT_DEVICE_CLASS,
    MODBUS_ONLY,
    TRANSPORTS,
    BleDevice,
    BleSettings,
    Device,
    ModbusRegister,
    MqttDevice,
    SerialDevice,
)
from gateway.config.dialects import DialectMetric, DialectSettings, build_dialects
from gateway.config.external import ExternalBrokerSettings
from gateway.config.homeassistant import HomeAssistantSettings
from gateway.config.http import HttpSettings
from gateway.config.liveness import LivenessSettings
from gateway.config.logs import LoggingSettings
from gateway.config.pipeline import (
    DEFAULT_METRIC_RULES,
    AnalyzeSettings,
    CleanSettings,
    MetricRules,
    PipelineSettings,
    TopicSettings,
)
from gateway.config.problems import problems
from gateway.config.rules import (
    RULE_KINDS,
    InactivityRuleSettings,
    RateRuleSettings,
    RuleSettings,
    ThresholdRuleSettings,
    ZScoreRuleSettings,
    inactivity_rules,
    series_rules,
)
from gateway.config.storage import StorageSettings
from gateway.errors import ConfigError
from gateway.forward.influxdb.settings import (
    INFLUX_DEFAULT_TAGS,
    INFLUX_NAME_FIELDS,
    InfluxForward,
    InfluxTag,
    NameTemplate,
)
from gateway.forward.kafka.settings import KafkaForward
from gateway.forward.mqtt.settings import MqttForward, RewriteRule, TlsSettings
from gateway.forward.nats.settings import NatsForward
from gateway.forward.rabbitmq.settings import RabbitForward
from gateway.forward.redis.settings import RedisForward
from gateway.forward.registry import FORWARD_TYPES, Forward, ForwardSettings
from gateway.forward.settings import ForwardSettingsBase, forward_topics
from gateway.settings import Level, Model, SecretEnv, SecretFile
from pipeline.errors import TopicError
from pipeline.topics import TopicTemplate

__all__ = [
    "BAUDRATES",
    "DEFAULT_DEVICE_CLASS",
    "DEFAULT_METRIC_RULES",
    "FORWARD_TYPES",
    "INFLUX_DEFAULT_TAGS",
    "INFLUX_NAME_FIELDS",
    "MODBUS_ONLY",
    "RULE_KINDS",
    "TRANSPORTS",
    "Access",
    "AclRule",
    "AnalyzeSettings",
    "BleDevice",
    "BleSettings",
    "BrokerListener",
    "BrokerSettings",
    "BrokerTls",
    "CatalogApplication",
    "CatalogField",
    "CatalogSettings",
    "CatalogType",
    "CatalogValue",
    "CleanSettings",
    "ConfigError",
    "Device",
    "DialectMetric",
    "DialectSettings",
    "ExternalBrokerSettings",
    "Forward",
    "ForwardSettings",
    "ForwardSettingsBase",
    "GatewayConfig",
    "HomeAssistantSettings",
    "HttpSettings",
    "InactivityRuleSettings",
    "InfluxForward",
    "InfluxTag",
    "KafkaForward",
    "Level",
    "LivenessSettings",
    "LoggingSettings",
    "MetricRules",
    "ModbusRegister",
    "MqttDevice",
    "MqttForward",
    "NameTemplate",
    "NatsForward",
    "PipelineSettings",
    "RabbitForward",
    "RateRuleSettings",
    "RedisForward",
    "RewriteRule",
    "RuleSettings",
    "SecretEnv",
    "SecretFile",
    "SerialDevice",
    "StorageSettings",
    "ThresholdRuleSettings",
    "TlsSettings",
    "TopicSettings",
    "ZScoreRuleSettings",
    "build_dialects",
    "forward_topics",
    "inactivity_rules",
    "load_config",
    "parse_config",
    "series_rules",
]

_LEVEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class GatewayConfig(Model):
    site: Level = "site1"
    broker: BrokerSettings = BrokerSettings()
    storage: StorageSettings = StorageSettings()
    pipeline: PipelineSettings = PipelineSettings()
    topics: TopicSettings = TopicSettings()
    ble: BleSettings = BleSettings()
    logging: LoggingSettings = LoggingSettings()
    http: HttpSettings = HttpSettings()
    gateway_id: Level | None = Field(default=None, description="default: SITE-HOSTNAME")
    devices: list[Device] = Field(default_factory=list)
    forward: list[Forward] = Field(default_factory=list)
    rules: list[RuleSettings] = Field(default_factory=list)
    catalog: CatalogSettings = CatalogSettings()
    dialects: list[DialectSettings] = Field(default_factory=list, description="foreign MQTT dialects, in order")
    liveness: LivenessSettings = LivenessSettings()
    homeassistant: HomeAssistantSettings = HomeAssistantSettings()

    @model_validator(mode="after")
    def _unique_devices(self) -> GatewayConfig:
        seen: set[str] = set()
        for device in self.devices:
            if device.id in seen:
                raise ValueError(f"device id {device.id!r} is configured twice")
            seen.add(device.id)
        names = [f.name for f in self.forward]
        if len(names) != len(set(names)):
            raise ValueError("forward names must be unique")
        rule_names = [r.name for r in self.rules]
        if len(rule_names) != len(set(rule_names)):
            raise ValueError("rule names must be unique")
        dialects = [d.effective_name for d in self.dialects]
        if len(dialects) != len(set(dialects)):
            raise ValueError("dialect names must be unique (give a second use of a preset a name)")
        try:
            template = TopicTemplate(self.topics.template)
            for dialect in self.dialects:
                dialect.to_dialect(template)
        except TopicError as exc:
            raise ValueError(f"dialects: {exc}") from None
        return self

    @model_validator(mode="after")
    def _broker_inside_the_disk_budget(self) -> GatewayConfig:
        budget, broker = self.storage.max_bytes, self.broker
        scaled = {name: min(getattr(broker, name), budget // part)  # defaults shrink with a small budget
                  for name, part in (("max_queued_bytes", 16), ("max_retained_bytes", 64))
                  if name not in broker.model_fields_set}
        if any(getattr(broker, name) != value for name, value in scaled.items()):
            object.__setattr__(self, "broker", broker.model_copy(update=scaled))  # still being validated
        share = self.broker.disk_share()
        if share > self.storage.max_bytes // 2:
            raise ValueError(
                f"broker.max_queued_bytes + broker.max_retained_bytes ({share} bytes) come out of storage.max_bytes "
                f"({self.storage.max_bytes}) and may take half of it at most: lower them or raise the budget")
        return self

    @property
    def effective_gateway_id(self) -> str:
        return self.gateway_id or f"{self.site}-{_LEVEL_UNSAFE.sub('-', socket.gethostname())}"

    @property
    def status_topic(self) -> str:
        """Where the gateway's retained online/offline status goes (``[liveness]``)."""
        return self.liveness.topic(self.site, self.effective_gateway_id)

    def device_class(self, device: SerialDevice | BleDevice | MqttDevice) -> str:
        return device.device_class or DEFAULT_DEVICE_CLASS[device.transport]

    def with_overrides(
        self, *, data_dir: Path | None = None, mqtt_port: int | None = None, http_port: int | None = None
    ) -> GatewayConfig:
        """The command line's flags win over the file (``--http-port`` also turns the HTTP API on)."""
        config = self
        if http_port is not None:
            http = config.http.model_dump() | {"enabled": True, "port": http_port}
            try:
                settings = HttpSettings.model_validate(http)
            except ValidationError as exc:
                raise ConfigError([f"http{'' if p.startswith('(') else '.'}{p}".replace("http(root)", "http")
                                   for p in problems(exc)]) from None
            config = config.model_copy(update={"http": settings})
        if data_dir is not None:
            config = config.model_copy(update={"storage": config.storage.model_copy(update={"data_dir": data_dir})})
        if mqtt_port is not None:
            config = config.model_copy(update={"broker": config.broker.model_copy(update={"port": mqtt_port})})
        return config


def parse_config(data: dict[str, Any]) -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems(exc)) from None


def load_config(path: Path) -> GatewayConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None
    return parse_config(data)
