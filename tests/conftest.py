"""What every layer needs. The layers:

- tests/unit: pure; no network connection or bind, no subprocess (tests/unit/conftest.py fails a test that tries);
  `make test-unit` runs only these.
- tests/component: the simulator, aiohttp and websockets in process on loopback, and subprocesses (the CLI, helm,
  hadolint, promtool, prometheus); no Kafka broker.
- tests/integration: through a real Kafka-protocol broker (the `kafka_broker` fixture in tests/integration/conftest.py);
  every test there carries the `integration` marker, so `-m integration` and `-m 'not integration'` still select them.
- tests/support: helpers and test doubles, imported as `tests.support.<module>`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent
_LAYERS = (_HERE / "unit", _HERE / "component", _HERE / "integration")


def _layer(item: pytest.Item) -> int:
    return next((rank for rank, layer in enumerate(_LAYERS) if item.path.is_relative_to(layer)), len(_LAYERS))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of tests/integration `integration`, and run the layers in order: unit, component, integration
    (the quick ones first, and the session broker's teardown after the last integration test, not inside a unit
    test's guard)."""
    for item in items:
        if item.path.is_relative_to(_HERE / "integration"):
            item.add_marker(pytest.mark.integration)
    items.sort(key=_layer)
