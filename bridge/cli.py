"""`ime-bridge run | capture | replay | demo | simulate | tail | check-config | config schema | schemas export`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from bridge import __version__
from bridge.config import ConfigError, SchemaRegistrySettings, Settings, load_settings
from bridge.logs import configure_logging
from bridge.registry import MISSING_CLIENT, client_installed
from bridge.signals import EXIT_INTERRUPTED, install_stop_signals

# Exit codes of `ime-bridge run` (README, Commands): 0 stopped by a signal, 1 a fatal runtime error (the
# orchestrator restarts the process), 2 a configuration refused, 70 an unexpected exception (EX_SOFTWARE, a bug).
EXIT_FATAL = 1
EXIT_CONFIG = 2
EXIT_SOFTWARE = 70

logger = logging.getLogger(__name__)


def _load(path: Path | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"ime-bridge: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from exc


async def _run(settings: Settings, config_path: Path | None, capture: CaptureOptions | None) -> None:
    from bridge.app import Bridge

    tune_garbage_collector()
    stop = asyncio.Event()
    install_stop_signals(stop)
    if capture is None:
        bridge = Bridge(settings, config_path=config_path)
    else:
        from bridge.capture import DEFAULT_MAX_BYTES, CaptureFileSink

        sink = CaptureFileSink(capture.out, max_bytes=capture.max_bytes or DEFAULT_MAX_BYTES)
        bridge = Bridge(settings, config_path=config_path, sink=sink, raw_only=True)
    # SIGHUP: re-read the file and reconcile subscriptions (only connections whose contracts change reopen).
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, bridge.request_reload)
    await bridge.run(stop)


def tune_garbage_collector() -> None:
    """Freeze what the start-up made and collect the young generation every 50,000 allocations, not 700.

    The bridge allocates short-lived records by the tens of thousands a second and makes almost no reference
    cycles, so the cyclic collector's frequent passes (over every object the imports and the start-up left)
    found nothing and cost about a sixth of the CPU per record at full speed (make bench, README Performance).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _fatal(reason: str, code: int) -> int:
    """Print the one final line of a fatal end, `ime-bridge: fatal: <reason>`, and return `code`."""
    print(f"ime-bridge: fatal: {' '.join(reason.split())}", file=sys.stderr)
    return code


@dataclass(frozen=True)
class CaptureOptions:
    """`ime-bridge capture`: where the raw records go instead of Kafka."""

    out: Path
    max_bytes: int | None  # None: the capture's default


def _cmd_capture(args: argparse.Namespace) -> int:
    """Run the bridge's connections, writing every frame to capture files (bridge/capture.py), not to Kafka."""
    return _cmd_run(args, CaptureOptions(args.out, args.max_bytes))


def _cmd_run(args: argparse.Namespace, capture: CaptureOptions | None = None) -> int:
    """Run the bridge; every fatal end is one `ime-bridge: fatal:` line on stderr and an exit code (EXIT_*)."""
    from bridge.app import PublisherFailed
    from bridge.records import SinkFatal
    from bridge.source import SourceFatal
    from bridge.spool import SpoolError

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"ime-bridge: {exc}", file=sys.stderr)
        return _fatal(f"invalid configuration: {'; '.join(exc.problems)}", EXIT_CONFIG)
    if _registry_client_missing(settings.schema_registry, "ime-bridge"):
        return _fatal(f"invalid configuration: {MISSING_CLIENT}", EXIT_CONFIG)
    configure_logging(settings.log.level, settings.log.format)
    try:
        asyncio.run(_run(settings, args.config, capture))
    # Already logged at CRITICAL (publisher_failed, sink_fatal, spool_unusable, source_failed).
    except PublisherFailed as exc:
        cause = f" ({exc.__cause__!r})" if exc.__cause__ is not None else ""
        reason, code = f"{exc}{cause}", EXIT_FATAL
    except SinkFatal as exc:
        reason, code = f"cannot publish: {exc}", EXIT_FATAL
    except SpoolError as exc:
        reason, code = f"spool unusable: {exc}", EXIT_FATAL
    except SourceFatal as exc:
        reason, code = f"IME source: {exc}", EXIT_FATAL
    except Exception as exc:
        logger.critical("unexpected_error", exc_info=exc)  # the traceback, on the structured log line
        reason, code = f"unexpected error: {exc!r}", EXIT_SOFTWARE
    else:
        return 0
    return _fatal(reason, code)


def _registry_client_missing(registry: SchemaRegistrySettings | None, program: str) -> bool:
    """A schema registry is configured but its client (the `registry` extra) is not installed: said on stderr."""
    if registry is None or client_installed():
        return False
    print(f"{program}: {MISSING_CLIENT}", file=sys.stderr)
    return True


def _cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the configuration (exit 2 when refused); with --connect also reach each service it names
    (exit 1 when one fails)."""
    settings = _load(args.config)
    ime, kafka = settings.ime, settings.kafka
    if _registry_client_missing(settings.schema_registry, "ime-bridge"):
        return EXIT_CONFIG
    print(
        f"configuration OK: {len(ime.contract_ids)} contract ids, {len(ime.contract_names)} contract names, "
        f"ws {ime.ws_url}, kafka {','.join(kafka.bootstrap_servers)} → {kafka.topic} (dead letters {kafka.dlq_topic})"
    )
    if not args.connect:
        return 0
    from bridge.connectcheck import check_connections

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its connection errors are in the report lines
    results = asyncio.run(check_connections(settings, args.timeout))
    for result in results:
        print(result.line())
    return 0 if all(result.ok for result in results) else 1


def _cmd_config_schema(args: argparse.Namespace) -> int:
    from bridge.config_schema import chart_config_schema, config_schema, dump, write_chart_schema

    if args.write is not None:
        try:
            changed = write_chart_schema(args.write)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(
                f"ime-bridge config schema: {args.write}: cannot update its properties.config: {exc!r}", file=sys.stderr
            )
            return 1
        print(f"{args.write}: properties.config {'regenerated' if changed else 'already current'}")
        return 0
    print(dump(chart_config_schema() if args.chart else config_schema()), end="")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    """Replay captured frames through today's normalizer and encoder; print what it did as one JSON line."""
    from bridge.raw import NotCaptured
    from bridge.records import SinkFatal
    from bridge.replay import Replay, frames_from_file, frames_from_topic, replay_kafka_settings
    from bridge.sink import KafkaSink

    settings = _load(args.config)
    if _registry_client_missing(settings.schema_registry, "ime-bridge replay"):
        return EXIT_CONFIG
    configure_logging(settings.log.level, settings.log.format)
    kafka = replay_kafka_settings(settings.kafka, args.to_topic)
    frames = frames_from_file(args.from_file) if args.from_file else frames_from_topic(settings.kafka, args.from_topic)

    async def replay() -> dict[str, object]:
        tune_garbage_collector()
        sink = KafkaSink(kafka, settings.schema_registry)
        summary = await Replay(settings, sink).run(
            frames,
            since_us=int(args.since.timestamp() * 1e6) if args.since else None,
            until_us=int(args.until.timestamp() * 1e6) if args.until else None,
            pace=args.pace,
        )
        return {"topic": kafka.topic, "dlq_topic": kafka.dlq_topic, **asdict(summary)}

    try:
        print(json.dumps(asyncio.run(replay())))
    except (OSError, NotCaptured, SinkFatal) as exc:
        return _fatal(f"replay: {exc}", EXIT_FATAL)
    except KeyboardInterrupt:
        return _fatal("replay: interrupted; what was acknowledged so far stays published", EXIT_INTERRUPTED)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from bridge.devtools import simulator

    configure_logging("INFO")
    stop = asyncio.Event()

    async def serve() -> None:
        install_stop_signals(stop)
        task = asyncio.create_task(simulator.run_from_args(args))
        await stop.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(serve())
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from bridge.config import KafkaSettings
    from bridge.tail import tail

    # With --config, the bridge's own connection settings (TLS, SASL, the registry's credentials); flags win.
    settings = _load(args.config) if args.config is not None else None
    try:
        kafka = settings.kafka if settings is not None else KafkaSettings()
        if args.bootstrap_servers is not None:
            kafka = KafkaSettings.model_validate({**kafka.model_dump(), "bootstrap_servers": args.bootstrap_servers})
        registry = settings.schema_registry if settings is not None else None
        if args.schema_registry is not None:
            registry = SchemaRegistrySettings.model_validate({"url": args.schema_registry, "retries": 1})
    except ValidationError as exc:
        error = exc.errors()[0]
        print(f"ime-bridge tail: {'.'.join(map(str, error['loc']))}: {error['msg']}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dead_letters:
        registry = None  # dead letters are raw frames: no schema to look up
    if _registry_client_missing(registry, "ime-bridge tail"):
        return EXIT_CONFIG
    topic = args.topic or (kafka.dlq_topic if args.dead_letters else kafka.topic)

    async def consume() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        task = asyncio.create_task(
            tail(
                kafka,
                topic,
                from_beginning=not args.from_end,
                max_records=args.max_records,
                idle_timeout=args.idle_timeout,
                table=args.table if args.table is not None else sys.stdout.isatty(),
                schema_registry=registry,
                keys=args.key or (),
                since=args.since,
                dead_letters=args.dead_letters,
            )
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # tail's own error (Kafka unreachable, refused credentials) ends the command

    try:
        asyncio.run(consume())
    except Exception as exc:
        print(f"ime-bridge tail: {exc!r}", file=sys.stderr)
        return 1
    return 0


def _schema_files(folder: Traversable, relative: PurePosixPath) -> Iterator[tuple[PurePosixPath, str]]:
    """(path relative to the package, text) of every .avsc file the package ships under `folder`."""
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        if entry.is_dir():
            yield from _schema_files(entry, relative / entry.name)
        elif entry.name.endswith(".avsc"):
            yield relative / entry.name, entry.read_text("utf-8")


def _cmd_schemas_export(args: argparse.Namespace) -> int:
    import importlib.resources

    from bridge.encode import schema_from_text

    try:
        for relative, text in _schema_files(importlib.resources.files("bridge.schemas"), PurePosixPath()):
            schema = schema_from_text(text)
            target = args.directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, "utf-8")
            print(f"{target}  {schema.name}  schema-fingerprint {schema.fingerprint}")
    except OSError as exc:
        print(f"ime-bridge schemas export: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from bridge.devtools.demo import run_demo

    configure_logging("WARNING")
    return asyncio.run(run_demo(duration=args.duration, contracts=args.contracts, rate=args.rate))


def _check_arguments(check: argparse.ArgumentParser) -> None:
    """The options of `check-config` and `config check`, the same command under two names."""
    check.add_argument("--config", type=Path, help="YAML config file (IME_BRIDGE_* variables override it)")
    check.add_argument(
        "--connect",
        action="store_true",
        help="also try the IME token endpoint, Kafka and the schema registry, and report each (exit 1 if one fails)",
    )
    check.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="deadline of each --connect check (10)"
    )
    check.set_defaults(handler=_cmd_check_config)


def _since(text: str) -> datetime:
    """--since: an ISO 8601 time (without an offset: UTC), or a duration back from now (90s, 15m, 2h, 1d)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        seconds = float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return datetime.now(UTC) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 time (2026-12-06T09:30:00+03:30) nor a duration (15m, 2h)"
        ) from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def build_parser(*, simulator_options: bool = True) -> argparse.ArgumentParser:
    """The command-line interface. The simulator's options load the simulator (a development tool): without
    `simulator_options`, the `simulate` command is listed but takes none, and nothing of it is imported."""
    parser = argparse.ArgumentParser(prog="ime-bridge", description="IME real-time WebSocket → validated Avro → Kafka.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the bridge", description="Run the bridge until SIGTERM/SIGINT.")
    run.add_argument("--config", type=Path, help="YAML config file (IME_BRIDGE_* variables override it)")
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser(
        "check-config", help="validate a configuration and exit", description="Exit 0 if valid, 2 with the reasons."
    )
    _check_arguments(check)

    config = commands.add_parser(
        "config", help="the configuration: its JSON Schema, or check one", description="The bridge's configuration."
    )
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    config_check = config_commands.add_parser(
        "check", help="the same as check-config", description="Exit 0 if valid, 2 with the reasons."
    )
    _check_arguments(config_check)
    config_schema = config_commands.add_parser(
        "schema",
        help="print the config file's JSON Schema",
        description="Print the JSON Schema (draft-07) of the config file, generated from the bridge's settings "
        "model. Cross-key rules (credentials, contracts) are check-config's.",
    )
    target = config_schema.add_mutually_exclusive_group()
    target.add_argument(
        "--chart",
        action="store_true",
        help="the Helm chart's `config` value instead: without the secrets and buffer.spool_dir, which the chart "
        "supplies, and without defaults (values.yaml holds the chart's)",
    )
    target.add_argument(
        "--write",
        type=Path,
        metavar="VALUES_SCHEMA_JSON",
        help="replace properties.config of this values.schema.json with the chart's schema, the rest unchanged "
        "(make chart-schema)",
    )
    config_schema.set_defaults(handler=_cmd_config_schema)

    capture = commands.add_parser(
        "capture",
        help="write every frame received to files, without Kafka",
        description="Keep the configured subscriptions and write every frame, as received, to JSON-lines files "
        "(zstd-compressed when PATH ends in .zst), rotated by size; ime-bridge replay --from-file reads them.",
    )
    capture.add_argument("--config", type=Path, help="YAML config file (IME_BRIDGE_* variables override it)")
    capture.add_argument("--out", type=Path, required=True, metavar="PATH", help="the first file of the series")
    capture.add_argument(
        "--max-bytes", type=int, help="JSON lines per file before the next one (bytes; default 64 MiB)"
    )
    capture.set_defaults(handler=_cmd_capture)

    replay = commands.add_parser(
        "replay",
        help="publish captured frames again, through today's normalizer",
        description="Run the normalizer and encoder over captured frames (a raw topic or capture files) and publish "
        "the records and dead letters as the bridge would, with a replay session id and a `replay` header; never "
        "to the latest-state topic.",
    )
    replay.add_argument("--config", type=Path, help="YAML config file (IME_BRIDGE_* variables override it)")
    origin = replay.add_mutually_exclusive_group(required=True)
    origin.add_argument("--from-topic", metavar="TOPIC", help="a raw topic (kafka.raw_topic of the capturing bridge)")
    origin.add_argument("--from-file", type=Path, metavar="PATH", help="the first file of a capture series")
    replay.add_argument("--since", type=_since, help="only frames received at or after this time (or duration back)")
    replay.add_argument("--until", type=_since, help="only frames received before this time (or duration back)")
    replay.add_argument("--to-topic", metavar="TOPIC", help="where the updates go (default: kafka.topic)")
    replay.add_argument("--pace", action="store_true", help="at the captured pace (default: as fast as Kafka takes)")
    replay.set_defaults(handler=_cmd_replay)

    simulate = commands.add_parser(
        "simulate", help="run the IME simulator", description="Serve a simulated IME service on one port."
    )
    if simulator_options:
        from bridge.devtools import simulator

        simulator.add_arguments(simulate)
    simulate.set_defaults(handler=_cmd_simulate)

    tail_cmd = commands.add_parser(
        "tail", help="print what the bridge publishes", description="Consume a topic and print decoded records."
    )
    tail_cmd.add_argument(
        "--config",
        type=Path,
        help="the bridge's config file: its Kafka connection (TLS, SASL), topic and schema registry",
    )
    tail_cmd.add_argument(
        "--bootstrap-servers", help="host:port[,host:port] (default: the config's, or localhost:9092)"
    )
    tail_cmd.add_argument(
        "--topic",
        help="default: the config's kafka.topic (ime.contract.updates), or kafka.dlq_topic with --dead-letters",
    )
    tail_cmd.add_argument(
        "--key", action="append", metavar="CONTRACT_ID", help="only records with this key (repeatable)"
    )
    tail_cmd.add_argument(
        "--since",
        type=_since,
        metavar="TIME",
        help="only records written at or after TIME: ISO 8601 (2026-12-06T09:30:00+03:30; UTC without an offset) "
        "or a duration back from now (90s, 15m, 2h, 1d)",
    )
    tail_cmd.add_argument(
        "--dead-letters",
        action="store_true",
        help="read the dead-letter topic: each record's reason, detail and a readable excerpt of the refused frame "
        "(one line each with --table, JSON lines without)",
    )
    tail_cmd.add_argument("--from-end", action="store_true", help="only new records (default: from the beginning)")
    tail_cmd.add_argument("--max-records", type=int, help="stop after this many records")
    tail_cmd.add_argument("--idle-timeout", type=float, help="stop after this many seconds without records")
    tail_cmd.add_argument(
        "--table",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live table of the latest record per contract, or one line per dead letter (default: on a terminal)",
    )
    tail_cmd.add_argument(
        "--schema-registry",
        metavar="URL",
        help="read values in Confluent's wire format with the schema this registry holds under their id",
    )
    tail_cmd.set_defaults(handler=_cmd_tail)

    schemas = commands.add_parser(
        "schemas",
        help="the Avro schemas of the records",
        description="The Avro schemas of the records the bridge publishes (schemas/ in the repository).",
    )
    schema_commands = schemas.add_subparsers(dest="schemas_command", required=True, metavar="ACTION")
    export = schema_commands.add_parser(
        "export",
        help="write the .avsc files a consumer needs",
        description="Write the .avsc files the bridge ships into DIRECTORY and print each one's schema-fingerprint "
        "(the header that names the writer schema of plain Avro records).",
    )
    export.add_argument("directory", type=Path, metavar="DIRECTORY")
    export.set_defaults(handler=_cmd_schemas_export)

    demo = commands.add_parser(
        "demo",
        help="broker + simulator + bridge, records flowing",
        description="Start an embedded broker, the simulator and the bridge, and show records arriving in Kafka.",
    )
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--contracts", type=int, default=8, help="simulated contracts to subscribe to")
    demo.add_argument("--rate", type=float, default=20.0, help="simulated snapshots per second")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ime-bridge` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(simulator_options=arguments[:1] == ["simulate"]).parse_args(arguments)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
