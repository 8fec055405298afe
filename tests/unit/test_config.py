"""config: strict settings, errors that name the key, environment overrides."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from bridge.config import ConfigError, load_settings

MINIMAL = "ime:\n  username: demo\n  password: secret\n  contract_ids: ['1001']\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    return caught.value.problems


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert str(settings.ime.base_url) == "https://core.hedgetech.ir/"
    assert str(settings.ime.ws_url) == "wss://core.hedgetech.ir/"
    assert settings.kafka.topic == "ime.contract.updates"
    assert settings.kafka.dlq_topic == "ime.contract.updates.dlq"
    assert settings.kafka.enable_idempotence is True
    assert settings.metrics.port == 9108


@pytest.mark.parametrize(
    ("profile", "linger_seconds", "batch_bytes", "round_records"),
    [("", 0.005, 524_288, 10_000), ("throughput", 0.005, 524_288, 10_000), ("latency", 0.0, 131_072, 1_000)],
)
def test_the_kafka_profile_sets_linger_batch_and_round_sizes(
    tmp_path: Path, profile: str, linger_seconds: float, batch_bytes: int, round_records: int
) -> None:
    settings = load_settings(write(tmp_path, MINIMAL + (f"kafka:\n  profile: {profile}\n" if profile else "")))
    assert settings.kafka.linger_seconds == linger_seconds
    assert settings.kafka.batch_bytes == batch_bytes
    assert settings.round_records == round_records


def test_explicit_keys_override_the_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL + "kafka:\n  profile: latency\n  linger_ms: 2\nbuffer:\n  max_batch_records: 300\n"
    monkeypatch.setenv("IME_BRIDGE_KAFKA__MAX_BATCH_BYTES", "65536")
    settings = load_settings(write(tmp_path, text))
    assert (settings.kafka.linger_seconds, settings.kafka.batch_bytes, settings.round_records) == (0.002, 65536, 300)
    # Explicitly zero is zero, not "unset".
    settings = load_settings(write(tmp_path, MINIMAL + "kafka:\n  linger_ms: 0\n"))
    assert settings.kafka.linger_seconds == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "  contract_nmes: [x]\n", "ime.contract_nmes: unknown key"),
        (MINIMAL + "kafak: {}\n", "kafak: unknown key"),
        (MINIMAL + "kafka:\n  partitions: 0\n", "kafka.partitions: Input should be greater than or equal to 1"),
        (MINIMAL + "kafka:\n  bootstrap_servers: nohost\n", "kafka.bootstrap_servers: 'nohost' is not host:port"),
        (MINIMAL + "kafka:\n  compression: brotli\n", "kafka.compression: Input should be"),
        (MINIMAL + "kafka:\n  dlq_topic: ime.contract.updates\n", "kafka: kafka.topic and kafka.dlq_topic must differ"),
        (
            MINIMAL + "kafka:\n  raw_topic: ime.contract.state\n",
            "kafka: kafka.raw_topic must differ from kafka.topic, kafka.dlq_topic and kafka.state_topic",
        ),
        (MINIMAL + "kafka:\n  raw_compression: brotli\n", "kafka.raw_compression: Input should be"),
        (MINIMAL + "kafka:\n  zstd_level: 23\n", "kafka.zstd_level: Input should be less than or equal to 22"),
        (MINIMAL + "buffer:\n  raw_memory_bytes: 10\n", "buffer.raw_memory_bytes: Input should be greater than"),
        (MINIMAL + "kafka:\n  profile: fast\n", "kafka.profile: Input should be 'latency' or 'throughput'"),
        (MINIMAL + "kafka:\n  linger_ms: -1\n", "kafka.linger_ms: Input should be greater than or equal to 0"),
        (MINIMAL + "buffer:\n  max_batch_records: 0\n", "buffer.max_batch_records: Input should be greater"),
        (MINIMAL + "metrics:\n  port: 70000\n", "metrics.port: Input should be less than or equal to 65535"),
        (MINIMAL + "  naive_timezone: Mars/Olympus\n", "ime.naive_timezone: unknown time zone 'Mars/Olympus'"),
        (MINIMAL.replace("wss", "") + "  ws_url: https://x\n", "ime.ws_url: URL scheme should be 'ws' or 'wss'"),
        ("ime:\n  contract_ids: ['1']\n", "ime: set ime.token, or both ime.username and ime.password"),
        ("ime:\n  token: t\n", "ime: subscribe to at least one contract"),
        ("ime:\n  token: t\n  contract_ids: ['1', '1']\n", "ime.contract_ids: listed more than once: 1"),
        ("- a list\n", "the top level must be a mapping"),
        ("ime: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key_and_the_reason(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(
    ("urls", "named"),
    [
        ("  base_url: http://ime.local\n", ["ime.base_url (http://)"]),
        ("  ws_url: ws://ime.local\n", ["ime.ws_url (ws://)"]),
        ("  base_url: http://ime.local\n  ws_url: ws://ime.local\n", ["ime.base_url (http://)", "ime.ws_url (ws://)"]),
    ],
)
def test_clear_text_urls_are_refused_unless_allowed(tmp_path: Path, urls: str, named: list[str]) -> None:
    (problem,) = problems(tmp_path, MINIMAL + urls)
    assert problem.startswith("ime: "), problem
    assert all(key in problem for key in named), problem
    assert "would send the password and the token in clear text" in problem
    assert "ime.allow_insecure: true" in problem
    settings = load_settings(write(tmp_path, MINIMAL + urls + "  allow_insecure: true\n"))
    assert settings.ime.allow_insecure is True


def test_encrypted_urls_need_no_allowance(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL + "  base_url: https://ime.local\n  ws_url: wss://ime.local\n"))
    assert settings.ime.allow_insecure is False
    assert (settings.ime.base_url.scheme, settings.ime.ws_url.scheme) == ("https", "wss")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IME_BRIDGE_KAFKA__TOPIC", "from-env")
    monkeypatch.setenv("IME_BRIDGE_KAFKA__BOOTSTRAP_SERVERS", "a:1, b:2")
    monkeypatch.setenv("IME_BRIDGE_IME__CONTRACT_NAMES", '["GC1405", "SAF1405"]')
    monkeypatch.setenv("IME_BRIDGE_IME__PASSWORD", "from-secret")
    settings = load_settings(write(tmp_path, MINIMAL + "kafka:\n  topic: from-file\n  partitions: 3\n"))
    assert settings.kafka.topic == "from-env"
    assert settings.kafka.partitions == 3
    assert settings.kafka.bootstrap_servers == ["a:1", "b:2"]
    assert settings.ime.contract_names == ["GC1405", "SAF1405"]
    assert settings.ime.contract_ids == ["1001"]
    assert settings.ime.password is not None
    assert settings.ime.password.get_secret_value() == "from-secret"


def test_malformed_environment_value_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IME_BRIDGE_IME__CONTRACT_IDS", "[not json")
    assert any(problem.startswith("ime.contract_ids: ") for problem in problems(tmp_path, MINIMAL))


def test_secrets_are_not_printed(tmp_path: Path) -> None:
    text = (
        "ime:\n  username: demo\n  password: pw-ime\n  contract_ids: ['1001']\n"
        "kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: OAUTHBEARER\n"
        "  sasl_oauth_token_url: https://idp.example/token\n  sasl_oauth_client_id: bridge\n"
        "  sasl_oauth_client_secret: pw-oauth\n  ssl_certfile: /c.pem\n  ssl_key_password: pw-key\n"
    )
    settings = load_settings(write(tmp_path, text))
    for secret in ("pw-ime", "pw-oauth", "pw-key"):
        assert secret not in repr(settings)
        assert secret not in str(settings.model_dump())


def test_example_config_is_valid_with_the_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IME_BRIDGE_IME__PASSWORD", "from-a-secret")
    settings = load_settings(Path(__file__).parents[2] / "config.example.yaml")
    assert settings.ime.contract_ids == ["1001", "1002"]
    assert settings.kafka.replication_factor == 3


# --- trading calendar: Iran's public holidays by default, ime.holidays on top ---------------------------

NOWRUZ_NOON = "2026-03-21T12:00:00+03:30"  # a Saturday (a session day) that is Nowruz
A_PLAIN_SATURDAY_NOON = "2026-03-28T12:00:00+03:30"


def _calendar_open(tmp_path: Path, extra: str, at: str) -> bool:
    calendar = load_settings(write(tmp_path, MINIMAL + extra)).ime.calendar
    return calendar.is_open(datetime.fromisoformat(at))


def test_iran_public_holidays_close_the_calendar_by_default(tmp_path: Path) -> None:
    """Without any holiday configured, Nowruz (from the holidays package's Iran) is closed, the next
    Saturday open; the lunar holidays of another year too (Eid al-Adha 2027 falls on a Monday)."""
    assert load_settings(write(tmp_path, MINIMAL)).ime.holiday_calendar == "IR"
    assert not _calendar_open(tmp_path, "", NOWRUZ_NOON)
    assert _calendar_open(tmp_path, "", A_PLAIN_SATURDAY_NOON)
    assert not _calendar_open(tmp_path, "", "2027-05-17T12:00:00+03:30")


def test_listed_holidays_add_to_the_public_ones(tmp_path: Path) -> None:
    """ime.holidays keeps its meaning (dates without trading) and adds to holiday_calendar's."""
    extra = "  holidays: ['2026-03-28']\n"
    assert not _calendar_open(tmp_path, extra, A_PLAIN_SATURDAY_NOON)
    assert not _calendar_open(tmp_path, extra, NOWRUZ_NOON)


def test_holiday_calendar_null_leaves_only_the_listed_holidays(tmp_path: Path) -> None:
    """holiday_calendar: null replaces the package's holidays by ime.holidays alone."""
    assert _calendar_open(tmp_path, "  holiday_calendar: null\n", NOWRUZ_NOON)
    assert not _calendar_open(tmp_path, "  holiday_calendar: null\n  holidays: ['2026-03-21']\n", NOWRUZ_NOON)


def test_unknown_holiday_calendar_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, MINIMAL + "  holiday_calendar: XX\n")
    assert any("ime.holiday_calendar: the holidays package has no calendar 'XX'" in problem for problem in found), found
