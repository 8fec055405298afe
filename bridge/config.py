"""The bridge's settings: one strict, typed object from a YAML file plus `IME_BRIDGE_` environment overrides.

Unknown keys and bad values are refused with the key and the reason (`ConfigError`), at start and by
`ime-bridge check-config`. Environment variables override the file: `IME_BRIDGE_KAFKA__TOPIC=x` sets
`kafka.topic`; lists take JSON (`IME_BRIDGE_IME__CONTRACT_IDS='["1001","1002"]'`). Secrets are
`SecretStr` and never printed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as holiday_data
import yaml
from pydantic import (
    AnyUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    UrlConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from bridge.calendar import DEFAULT_IME_SESSIONS, TradingCalendar

ENV_PREFIX = "IME_BRIDGE_"

# The json_schema_extra keywords restate a validation for `ime-bridge config schema` (the Helm chart's schema),
# which pydantic's JSON Schema would not carry: the URL schemes, unique contracts, host:port.
HttpUrl = Annotated[
    AnyUrl,
    UrlConstraints(allowed_schemes=["http", "https"], host_required=True),
    Field(json_schema_extra={"pattern": "^https?://"}),
]
WebSocketUrl = Annotated[
    AnyUrl,
    UrlConstraints(allowed_schemes=["ws", "wss"], host_required=True),
    Field(json_schema_extra={"pattern": "^wss?://"}),
]
PositiveSeconds = Annotated[float, Field(gt=0)]


def _list_from_text(value: Any) -> Any:
    """Environment values for lists: a JSON array, or a comma-separated list."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        return json.loads(value)
    return [part.strip() for part in value.split(",") if part.strip()]


ContractList = Annotated[
    list[Annotated[str, Field(min_length=1)]],
    NoDecode,
    BeforeValidator(_list_from_text),
    Field(json_schema_extra={"uniqueItems": True}),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImeSettings(_Section):
    """Where and how to reach the IME service, and what to subscribe to."""

    base_url: HttpUrl = Field(
        default=AnyUrl("https://core.hedgetech.ir"),
        description="HTTP root of the token and static endpoints.",
    )
    ws_url: WebSocketUrl = Field(
        default=AnyUrl("wss://core.hedgetech.ir"), description="WebSocket root of the live endpoints."
    )
    allow_insecure: bool = Field(
        default=False,
        description="Accept http:// and ws:// URLs, which send the password and the token in clear text "
        "(a local simulator only).",
    )
    username: str | None = Field(default=None, description="Account for the token endpoint.")
    password: SecretStr | None = Field(default=None, description="Password for the token endpoint.")
    token: SecretStr | None = Field(default=None, description="A static JWT, instead of username/password.")
    token_form: Literal["documented", "sdk"] = Field(
        default="documented",
        description="Token form field names: username/password (documented) or UserName_or_Email/Password.",
    )
    bearer: bool = Field(default=False, description="Send `Authorization: Bearer <JWT>` instead of the raw JWT.")
    contract_ids: ContractList = Field(
        default_factory=list, description="Contracts to subscribe to on the by-id endpoint."
    )
    contract_names: ContractList = Field(
        default_factory=list, description="Contracts to subscribe to on the by-name endpoint."
    )
    naive_timezone: str = Field(default="UTC", description="Zone in which timestamps without a zone are read.")
    http_timeout_seconds: PositiveSeconds = 10.0
    open_timeout_seconds: PositiveSeconds = 10.0
    ping_interval_seconds: PositiveSeconds = 20.0
    ping_timeout_seconds: PositiveSeconds = 20.0
    reconnect_min_seconds: PositiveSeconds = 0.5
    reconnect_max_seconds: PositiveSeconds = 30.0
    max_contracts_per_connection: int = Field(default=100, ge=1, description="Contracts per WebSocket connection.")
    max_url_length: int = Field(default=4000, ge=256, description="Longest subscription URL the bridge builds.")
    compression: bool = Field(default=False, description="Offer permessage-deflate (costs CPU, saves bandwidth).")
    healthy_after_seconds: PositiveSeconds = Field(
        default=30.0, description="A connection up this long resets the reconnect backoff."
    )
    max_frame_bytes: int = Field(
        default=1_048_576, ge=1024, description="Larger frames are dead-lettered as `oversized`."
    )
    token_refresh_margin_seconds: PositiveSeconds = Field(
        default=120.0,
        description="Issue a new token this long before the current one expires (at most a quarter of its lifetime).",
    )
    token_request_interval_seconds: PositiveSeconds = Field(
        default=2.0, description="Token requests at most this often, shared by every connection and probe."
    )
    auth_rejected_backoff_seconds: PositiveSeconds = Field(
        default=300.0, description="Wait after the token endpoint refuses the credentials (no hot loop)."
    )
    rate_limited_backoff_seconds: PositiveSeconds = Field(
        default=30.0, description="Least wait after a handshake answered 429."
    )
    stale_after_seconds: float = Field(
        default=300.0,
        ge=0,
        description="Reconnect a connection silent this long during trading sessions (0 = no watchdog).",
    )
    trading_sessions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IME_SESSIONS),
        description="When IME trades (the watchdog is off outside), e.g. 'sat-wed 08:30-17:30'.",
    )
    trading_timezone: str = Field(default="Asia/Tehran", description="Zone of trading_sessions and holidays.")
    holiday_calendar: str | None = Field(
        default="IR",
        description="Country code of the `holidays` package's public holidays that close the calendar "
        "(IR: Iran's, lunar dates included); null for none, so that only `holidays` counts.",
    )
    holidays: list[date] = Field(
        default_factory=list, description="Dates without trading, in addition to holiday_calendar's."
    )
    quarantine_reprobe_seconds: PositiveSeconds = Field(
        default=600.0, description="How often quarantined contracts are tried again."
    )
    name_refresh_seconds: PositiveSeconds = Field(
        default=3600.0, description="How often contract names are resolved to ids again."
    )

    @field_validator("naive_timezone", "trading_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("holiday_calendar")
    @classmethod
    def _known_holiday_calendar(cls, value: str | None) -> str | None:
        if value is not None and value not in holiday_data.list_supported_countries():
            raise ValueError(f"the holidays package has no calendar {value!r} (Iran's is 'IR')")
        return value

    @field_validator("trading_sessions")
    @classmethod
    def _sessions_parse(cls, specs: list[str]) -> list[str]:
        TradingCalendar.parse(specs)  # raises ValueError naming the bad spec
        return specs

    @field_validator("contract_ids", "contract_names")
    @classmethod
    def _no_duplicates(cls, values: list[str]) -> list[str]:
        duplicates = sorted({value for value in values if values.count(value) > 1})
        if duplicates:
            raise ValueError(f"listed more than once: {', '.join(duplicates)}")
        return values

    @model_validator(mode="after")
    def _credentials_and_contracts(self) -> ImeSettings:
        if self.token is None and (self.username is None or self.password is None):
            raise ValueError("set ime.token, or both ime.username and ime.password")
        if not self.contract_ids and not self.contract_names:
            raise ValueError("subscribe to at least one contract: ime.contract_ids or ime.contract_names")
        if self.reconnect_min_seconds > self.reconnect_max_seconds:
            raise ValueError("ime.reconnect_min_seconds is larger than ime.reconnect_max_seconds")
        return self

    @model_validator(mode="after")
    def _encrypted_unless_allowed(self) -> ImeSettings:
        if self.allow_insecure:
            return self
        clear = [
            f"ime.{key} ({url.scheme}://)"
            for key, url in (("base_url", self.base_url), ("ws_url", self.ws_url))
            if url.scheme in ("http", "ws")
        ]
        if clear:
            raise ValueError(
                f"{' and '.join(clear)} would send the password and the token in clear text: "
                "use https:// and wss://, or set ime.allow_insecure: true (a local simulator only)"
            )
        return self

    @property
    def timezone(self) -> ZoneInfo:
        """`naive_timezone` as a tzinfo."""
        return ZoneInfo(self.naive_timezone)

    @property
    def max_message_bytes(self) -> int:
        """The WebSocket's frame size limit: room above max_frame_bytes, so that an oversized frame is read and
        dead-lettered with its reason rather than ending the connection (1009)."""
        return 4 * self.max_frame_bytes

    @cached_property
    def calendar(self) -> TradingCalendar:
        """The trading calendar the data watchdog and ime_bridge_trading_session_open follow (built once: the
        source and the bridge's gauge share it)."""
        public = None if self.holiday_calendar is None else holiday_data.country_holidays(self.holiday_calendar)
        return TradingCalendar.parse(
            self.trading_sessions, self.trading_timezone, [day.isoformat() for day in self.holidays], public
        )


@dataclass(frozen=True)
class KafkaProfile:
    """What `kafka.profile` sets where the keys are not set explicitly (README, Performance, has the trade-off)."""

    linger_ms: int  # how long a publish round waits for more records, from its oldest record's receipt
    max_batch_bytes: int  # bytes per partition per round
    round_records: int  # records per round (buffer.max_batch_records)


PROFILES = {
    # Each round goes as soon as the previous one is acknowledged: the lowest receive→ack latency, at the cost
    # of more, smaller rounds (CPU per record); smaller rounds also bound how long a backlog's head waits.
    "latency": KafkaProfile(linger_ms=0, max_batch_bytes=131_072, round_records=1_000),
    # Rounds linger for more records: fewer, larger produce requests, a few milliseconds more latency.
    "throughput": KafkaProfile(linger_ms=5, max_batch_bytes=524_288, round_records=10_000),
}


class KafkaSettings(_Section):
    """The Kafka cluster and topics the bridge publishes to."""

    bootstrap_servers: Annotated[
        list[Annotated[str, Field(json_schema_extra={"pattern": "^.+:[0-9]+$"})]],
        NoDecode,
        BeforeValidator(_list_from_text),
        Field(min_length=1),
    ] = Field(default_factory=lambda: ["localhost:9092"], description="Bootstrap servers, host:port.")
    client_id: str = "ime-bridge"
    topic: str = Field(default="ime.contract.updates", min_length=1, max_length=249)
    dlq_topic: str = Field(default="ime.contract.updates.dlq", min_length=1, max_length=249)
    create_topics: bool = Field(default=True, description="Create missing topics at start.")
    partitions: int = Field(default=6, ge=1, description="Partitions of topics the bridge creates.")
    replication_factor: int = Field(default=3, ge=1, description="Replication of topics the bridge creates.")
    enable_idempotence: bool = Field(
        default=True,
        description="Idempotent producer (no duplicates on retries); needs a broker that supports it.",
    )
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        default="none",
        description="Compression of the updates, state and dead-letter batches. In aiokafka, zstd and snappy cost a "
        "fraction of a µs per record more than none, lz4 (level 9) about five times zstd, gzip fifteen times "
        "(docs/performance.md).",
    )
    profile: Literal["latency", "throughput"] = Field(
        default="throughput",
        description="Defaults of linger_ms, max_batch_bytes and buffer.max_batch_records: latency (0 ms, 128 KiB, "
        "1,000 records) or throughput (5 ms, 512 KiB, 10,000 records).",
    )
    linger_ms: int | None = Field(
        default=None,
        ge=0,
        le=60_000,
        description="How long a publish round waits for more records, from its oldest record's receipt (unset: "
        "the profile's).",
    )
    max_batch_bytes: int | None = Field(
        default=None, ge=1024, description="Bytes per partition per publish round (unset: the profile's)."
    )
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        default=None, description="SASL mechanism (needs a SASL_* security_protocol)."
    )
    sasl_username: str | None = Field(default=None, description="PLAIN/SCRAM: the user (with sasl_password).")
    sasl_password: SecretStr | None = Field(default=None, description="PLAIN/SCRAM: the user's password.")
    sasl_oauth_token_url: HttpUrl | None = Field(
        default=None, description="OAUTHBEARER: the OAuth 2.0 token endpoint (client-credentials grant)."
    )
    sasl_oauth_client_id: str | None = Field(default=None, description="OAUTHBEARER: the OAuth client id.")
    sasl_oauth_client_secret: SecretStr | None = Field(default=None, description="OAUTHBEARER: the client's secret.")
    sasl_oauth_scope: str | None = Field(
        default=None, description="OAUTHBEARER: the scope to request (space-separated; unset: the server's default)."
    )
    ssl_cafile: Path | None = Field(
        default=None, description="CA bundle that verifies the brokers' certificates (default: the system's)."
    )
    ssl_certfile: Path | None = Field(
        default=None, description="Client certificate (PEM) for mutual TLS (needs an SSL or SASL_SSL protocol)."
    )
    ssl_keyfile: Path | None = Field(
        default=None, description="Private key (PEM) of ssl_certfile, when the certificate file does not hold it."
    )
    ssl_key_password: SecretStr | None = Field(default=None, description="Password of an encrypted ssl_keyfile.")
    state_topic: str = Field(
        default="ime.contract.state",
        min_length=1,
        max_length=249,
        description="Compacted topic holding the latest snapshot of each contract (key = contract id).",
    )
    state_topic_enabled: bool = Field(
        default=True,
        description="Publish the latest snapshots to state_topic too (created with cleanup.policy=compact).",
    )
    raw_topic: str = Field(
        default="",
        max_length=249,
        description="Every frame as received, before parsing, for replay (bridge/raw.py); empty: off.",
    )
    raw_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        default="zstd",
        description="Compression of the raw topic's batches; zstd needs Kafka 2.1 or later (a broker refusing it gets "
        "them uncompressed). zstd compresses frames best and cheaply; lz4 costs about five times its CPU, gzip "
        "fifteen times (kafka.compression).",
    )
    zstd_level: int = Field(
        default=1,
        ge=1,
        le=22,
        description="zstd's level for every zstd batch (kafka.compression, kafka.raw_compression). 1 compresses "
        "the simulator's frames 13.7 times against level 3's (Kafka's default) 14.4, compressing in a seventh (large "
        "batches) to a third (a paced round's) less time; higher levels cost more CPU for a little more ratio.",
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_and_port(cls, servers: list[str]) -> list[str]:
        for server in servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{server!r} is not host:port")
        return servers

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        if self.topic == self.dlq_topic:
            raise ValueError("kafka.topic and kafka.dlq_topic must differ")
        return self

    @model_validator(mode="after")
    def _security_consistent(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL_")
        if self.sasl_mechanism is not None and not sasl:
            raise ValueError("kafka.sasl_mechanism needs kafka.security_protocol SASL_PLAINTEXT or SASL_SSL")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(f"kafka.security_protocol {self.security_protocol} needs kafka.sasl_mechanism")
        oauth = {
            "sasl_oauth_token_url": self.sasl_oauth_token_url,
            "sasl_oauth_client_id": self.sasl_oauth_client_id,
            "sasl_oauth_client_secret": self.sasl_oauth_client_secret,
        }
        if self.sasl_mechanism == "OAUTHBEARER":
            if missing := [f"kafka.{key}" for key, value in oauth.items() if value is None]:
                raise ValueError(f"kafka.sasl_mechanism OAUTHBEARER needs {' and '.join(missing)}")
        else:
            if given := [f"kafka.{key}" for key, value in oauth.items() if value is not None] + (
                ["kafka.sasl_oauth_scope"] if self.sasl_oauth_scope is not None else []
            ):
                raise ValueError(f"{', '.join(given)}: only for kafka.sasl_mechanism OAUTHBEARER")
            if self.sasl_mechanism and (self.sasl_username is None or self.sasl_password is None):
                raise ValueError(
                    f"kafka.sasl_mechanism {self.sasl_mechanism} needs kafka.sasl_username and kafka.sasl_password"
                )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("kafka.ssl_keyfile needs kafka.ssl_certfile")
        if self.ssl_key_password is not None and self.ssl_certfile is None:
            raise ValueError("kafka.ssl_key_password needs kafka.ssl_certfile")
        if self.ssl_certfile is not None and self.security_protocol not in ("SSL", "SASL_SSL"):
            raise ValueError("kafka.ssl_certfile needs kafka.security_protocol SSL or SASL_SSL")
        return self

    @model_validator(mode="after")
    def _state_topic_is_its_own(self) -> KafkaSettings:
        if self.state_topic_enabled and self.state_topic in (self.topic, self.dlq_topic):
            raise ValueError("kafka.state_topic must differ from kafka.topic and kafka.dlq_topic")
        return self

    @model_validator(mode="after")
    def _raw_topic_is_its_own(self) -> KafkaSettings:
        others = [self.topic, self.dlq_topic, *([self.state_topic] if self.state_topic_enabled else [])]
        if self.raw_topic and self.raw_topic in others:
            raise ValueError("kafka.raw_topic must differ from kafka.topic, kafka.dlq_topic and kafka.state_topic")
        return self

    @property
    def linger_seconds(self) -> float:
        """linger_ms, or the profile's, in seconds."""
        return (PROFILES[self.profile].linger_ms if self.linger_ms is None else self.linger_ms) / 1000

    @property
    def batch_bytes(self) -> int:
        """max_batch_bytes, or the profile's."""
        return PROFILES[self.profile].max_batch_bytes if self.max_batch_bytes is None else self.max_batch_bytes

    @property
    def topics(self) -> list[str]:
        """Every topic the bridge writes: updates, dead letters, and the latest-state and raw topics when on."""
        return [
            self.topic,
            self.dlq_topic,
            *([self.state_topic] if self.state_topic_enabled else []),
            *([self.raw_topic] if self.raw_topic else []),
        ]


class BufferSettings(_Section):
    """The buffer between the WebSocket readers and Kafka; see bridge/buffer.py."""

    overflow: Literal["conflate", "spool"] = Field(
        default="conflate", description="When Kafka is slower than the feed: keep the latest per contract, or spool."
    )
    capacity_records: int = Field(
        default=100_000, ge=1, description="conflate: records in memory before conflation starts."
    )
    max_batch_records: int | None = Field(
        default=None, ge=1, description="Records per publish round (unset: kafka.profile's)."
    )
    suppress_duplicates: bool = Field(
        default=False, description="Drop a snapshot whose market data equals the contract's previous one."
    )
    dead_letter_memory_bytes: int = Field(
        default=64 << 20,
        ge=1 << 20,
        description="Dead letters waiting in memory at most (bytes); past it new ones are dropped and counted.",
    )
    raw_memory_bytes: int = Field(
        default=64 << 20,
        ge=1 << 20,
        description="Raw frames (kafka.raw_topic) waiting in memory at most (bytes); past it new ones are dropped "
        "and counted (conflate mode; spool mode spools them).",
    )
    dead_letter_raw_bytes: int = Field(
        default=512 << 10, ge=1024, le=1 << 20, description="The start of a refused frame a dead letter keeps (bytes)."
    )
    spool_dir: Path | None = Field(default=None, description="spool: directory of the spool (required for spool).")
    spool_after_records: int = Field(
        default=1000, ge=1, description="spool: records in memory before new ones go to the spool."
    )
    spool_after_seconds: PositiveSeconds = Field(
        default=1.0,
        description="spool: how long a record may wait unacknowledged before it, and all behind it, go to the spool.",
    )
    spool_max_bytes: int = Field(default=1 << 30, ge=1 << 20, description="spool: the spool's size limit.")
    spool_fsync_interval_seconds: PositiveSeconds = Field(
        default=0.2, description="spool: fsync period, what a power loss can take at most."
    )

    @model_validator(mode="after")
    def _spool_needs_a_directory(self) -> BufferSettings:
        if self.overflow == "spool" and self.spool_dir is None:
            raise ValueError("buffer.overflow: spool needs buffer.spool_dir")
        return self


class CoordinationSettings(_Section):
    """Replicas sharing the contracts through a Kafka consumer group (docs/scaling.md); off by default."""

    group_id: str = Field(
        default="",
        max_length=249,
        description="Consumer group of the replicas that share the contracts; empty: this process owns them all.",
    )
    topic: str = Field(
        default="ime-bridge.coordination",
        min_length=1,
        max_length=249,
        description="Control topic, one partition per shard: assignments and release markers.",
    )
    shards: int = Field(
        default=64, ge=1, le=4096, description="Shards the contracts map to (by a stable hash of the contract id)."
    )
    handover_timeout_seconds: PositiveSeconds = Field(
        default=10.0,
        description="Each step of a handover is bounded by this: the giver serves a released shard until its new "
        "owner has subscribed, then delivers its records; the new owner waits at most this long for the release.",
    )
    session_timeout_ms: int = Field(
        default=10_000, ge=1000, le=300_000, description="Group session timeout: how soon a dead replica is noticed."
    )
    heartbeat_interval_ms: int = Field(default=3000, ge=100, description="Group heartbeat period.")

    @property
    def enabled(self) -> bool:
        """Whether replicas share the contracts (a group id is set)."""
        return bool(self.group_id)

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> CoordinationSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("coordination.heartbeat_interval_ms must be at most a third of session_timeout_ms")
        return self


class MetricsSettings(_Section):
    """The HTTP endpoint serving /metrics, /healthz and /readyz."""

    host: str = "0.0.0.0"
    port: int = Field(default=9108, ge=0, le=65535)


class LogSettings(_Section):
    """Logging: one event per line."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["logfmt", "json"] = "logfmt"


class SchemaRegistrySettings(_Section):
    """A Confluent Schema Registry: value schemas are registered at start, update values framed with their id."""

    url: HttpUrl = Field(
        description="Base URL of the registry, e.g. https://schema-registry:8081 (no credentials in it).",
        json_schema_extra={"pattern": "^https?://[^@/]+(/.*)?$"},
    )
    username: str | None = Field(default=None, description="Basic-auth user (with password).")
    password: SecretStr | None = Field(default=None, description="Basic-auth password.")
    ssl_cafile: Path | None = Field(
        default=None, description="CA bundle that verifies the registry's certificate (default: the system's)."
    )
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (PEM) for mutual TLS.")
    ssl_keyfile: Path | None = Field(
        default=None, description="Private key (PEM) of ssl_certfile, when the certificate file does not hold it."
    )
    timeout_seconds: PositiveSeconds = Field(default=10.0, description="Deadline of each registry call.")
    retries: int = Field(
        default=3, ge=0, le=100, description="Retries of a failed registry call, with backoff, before the start fails."
    )
    auto_register: bool = Field(
        default=True,
        description="Register the value schemas at start; off: only look up their ids (registries where producers "
        "may not register; a schema not registered there stops the start).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SchemaRegistrySettings:
        if self.url.username or self.url.password:
            raise ValueError("schema_registry.url must not carry credentials: set username and password")
        if (self.username is None) != (self.password is None):
            raise ValueError("schema_registry.username and schema_registry.password go together")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("schema_registry.ssl_keyfile needs schema_registry.ssl_certfile")
        if self.url.scheme != "https" and (self.ssl_cafile or self.ssl_certfile):
            raise ValueError("schema_registry.ssl_* options need an https:// url")
        return self


class Settings(BaseSettings):
    """Everything the bridge needs to run; see config.example.yaml for every key with its default."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True)

    ime: ImeSettings
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    buffer: BufferSettings = Field(default_factory=BufferSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    coordination: CoordinationSettings = Field(default_factory=CoordinationSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    schema_registry: SchemaRegistrySettings | None = Field(
        default=None, description="Frame update values in the Confluent wire format; unset: plain Avro + headers."
    )
    shutdown_timeout_seconds: PositiveSeconds = Field(
        default=20.0, description="Budget for an orderly stop: close sockets, drain, flush."
    )

    @property
    def round_records(self) -> int:
        """Records per publish round: buffer.max_batch_records, or kafka.profile's."""
        explicit = self.buffer.max_batch_records
        return PROFILES[self.kafka.profile].round_records if explicit is None else explicit

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file, which arrives as init arguments.
        return env_settings, init_settings


class ConfigError(Exception):
    """A configuration the bridge refuses, with one line per offending key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  {problem}" for problem in problems))
        self.problems = problems


def load_settings(path: Path | None) -> Settings:
    """Read `path` (YAML) and the environment into Settings, or raise ConfigError naming each bad key."""
    document: Any = {}
    if path is not None:
        try:
            document = yaml.safe_load(path.read_text("utf-8")) or {}
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
        if not isinstance(document, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    try:
        return Settings(**document)
    except ValidationError as exc:
        raise ConfigError([_describe(error) for error in exc.errors()]) from exc
    except (SettingsError, ValueError) as exc:
        # The environment source fails before validation, e.g. on a malformed JSON list.
        raise ConfigError([f"environment ({ENV_PREFIX}*): {exc} ({exc.__cause__})"]) from exc


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{key}: {message}"
