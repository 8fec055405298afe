"""Development tools: the IME simulator and its market, the embedded Kafka-protocol broker and the demo.

The product never imports these (import-linter checks it); only the CLI's `simulate` and `demo` commands, the
tests and the benchmark load them.
"""
