"""The Avro schemas, shipped inside the package as `bridge.schemas` (see schemas/README.md)."""
