"""ime-bridge: IME real-time WebSocket to Kafka, as validated Avro."""

__version__ = "0.1.0"
