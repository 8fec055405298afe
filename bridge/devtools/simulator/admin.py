"""The simulator's admin part: `POST /admin/...` switches every fault mode of a `Simulator` (one method each,
see the package docstring's table) and `GET /admin/stats` reports its counters and connections."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.devtools.simulator.model import ADMIN_PREFIX, CLOSE_INTERNAL_ERROR, GARBAGE_KINDS

if TYPE_CHECKING:
    from bridge.devtools.simulator.server import Simulator

_Action = Callable[[web.Request], Coroutine[Any, Any, dict[str, Any]]]


class AdminEndpoints:
    """The admin endpoints of one simulator; each answers `{"ok": true, ...}`, or 400 on a bad parameter."""

    def __init__(self, simulator: Simulator) -> None:
        self._simulator = simulator

    def add_routes(self, app: web.Application) -> None:
        """Serve the admin endpoints on `app`."""
        admin: list[tuple[str, _Action]] = [
            ("drop", self._admin_drop),
            ("close", self._admin_close),
            ("stall", self._admin_stall),
            ("accept-then-close", self._admin_accept_then_close),
            ("tokens/revoke", self._admin_revoke),
            ("tokens/expire", self._admin_expire),
            ("tokens/close-on-expiry", self._admin_close_on_expiry),
            ("ignore-close-frames", self._admin_ignore_close_frames),
            ("contracts/invalidate", self._admin_invalidate),
            ("contracts/revalidate", self._admin_revalidate),
            ("garbage", self._admin_garbage),
            ("oversized", self._admin_oversized),
            ("handshake/delay", self._admin_handshake_delay),
            ("handshake/reject", self._admin_handshake_reject),
            ("token/reject", self._admin_token_reject),
            ("token/rate-limit", self._admin_token_rate_limit),
            ("reset", self._admin_reset),
        ]
        for name, action in admin:
            app.router.add_post(f"{ADMIN_PREFIX}/{name}", self._admin_handler(action))
        app.router.add_get(f"{ADMIN_PREFIX}/stats", self._admin_stats)

    def _admin_handler(self, action: _Action) -> Callable[[web.Request], Coroutine[Any, Any, web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            try:
                result = await action(request)
            except ValueError as exc:
                return web.json_response({"ok": False, "detail": str(exc)}, status=400)
            return web.json_response({"ok": True, **result})

        return handle

    async def _admin_drop(self, request: web.Request) -> dict[str, Any]:
        return {"connections": await self._simulator.drop_connections()}

    async def _admin_close(self, request: web.Request) -> dict[str, Any]:
        code = _int_param(request, "code")
        closed = await self._simulator.close_connections(
            CLOSE_INTERNAL_ERROR if code is None else code, request.query.get("message", "")
        )
        return {"connections": closed}

    async def _admin_stall(self, request: web.Request) -> dict[str, Any]:
        self._simulator.stall(_bool_param(request, "enabled", True))
        return {"stalled": self._simulator.fault_modes()["stalled"]}

    async def _admin_accept_then_close(self, request: web.Request) -> dict[str, Any]:
        code: int | None = None
        if request.query.get("code") != "abrupt":
            given = _int_param(request, "code")
            code = CLOSE_INTERNAL_ERROR if given is None else given
        self._simulator.accept_then_close(_bool_param(request, "enabled", True), code=code)
        return {"enabled": self._simulator.fault_modes()["accept_then_close"], "code": code}

    async def _admin_revoke(self, request: web.Request) -> dict[str, Any]:
        self._simulator.revoke_tokens()
        return {}

    async def _admin_expire(self, request: web.Request) -> dict[str, Any]:
        self._simulator.expire_tokens(_float_param(request, "ttl"))
        return {"token_ttl": self._simulator.config.token_ttl}

    async def _admin_close_on_expiry(self, request: web.Request) -> dict[str, Any]:
        closed = self._simulator.close_on_token_expiry(_bool_param(request, "enabled", True))
        return {"enabled": self._simulator.fault_modes()["close_on_token_expiry"], "connections": closed}

    async def _admin_ignore_close_frames(self, request: web.Request) -> dict[str, Any]:
        self._simulator.ignore_close_frames(_bool_param(request, "enabled", True))
        return {"enabled": self._simulator.fault_modes()["ignore_close_frames"]}

    async def _admin_invalidate(self, request: web.Request) -> dict[str, Any]:
        identifiers = request.query.getall("contract", [])
        closed = await self._simulator.invalidate_contracts(identifiers, delist=_bool_param(request, "delist", False))
        return {"connections": closed}

    async def _admin_revalidate(self, request: web.Request) -> dict[str, Any]:
        self._simulator.revalidate_contracts(request.query.getall("contract", []))
        return {}

    async def _admin_garbage(self, request: web.Request) -> dict[str, Any]:
        kind = request.query.get("kind", "text")
        for known in GARBAGE_KINDS:
            if kind == known:
                return {"connections": self._simulator.send_garbage(known)}
        raise ValueError(f"kind must be one of {', '.join(GARBAGE_KINDS)}")

    async def _admin_oversized(self, request: web.Request) -> dict[str, Any]:
        return {"connections": self._simulator.send_oversized(_int_param(request, "size"))}

    async def _admin_handshake_delay(self, request: web.Request) -> dict[str, Any]:
        self._simulator.delay_handshakes(_float_param(request, "seconds") or 0.0)
        return {"seconds": self._simulator.fault_modes()["handshake_delay"]}

    async def _admin_handshake_reject(self, request: web.Request) -> dict[str, Any]:
        self._simulator.reject_handshakes(_status_param(request), retry_after=_retry_after_param(request))
        return {"status": self._simulator.fault_modes()["handshake_status"]}

    async def _admin_token_reject(self, request: web.Request) -> dict[str, Any]:
        self._simulator.reject_token_requests(_status_param(request), retry_after=_retry_after_param(request))
        return {"status": self._simulator.fault_modes()["token_status"]}

    async def _admin_token_rate_limit(self, request: web.Request) -> dict[str, Any]:
        self._simulator.rate_limit_token_requests(_float_param(request, "seconds") or 0.0)
        return {"seconds": self._simulator.fault_modes()["token_rate_limit"]}

    async def _admin_reset(self, request: web.Request) -> dict[str, Any]:
        self._simulator.reset_faults()
        return {}

    async def _admin_stats(self, request: web.Request) -> web.Response:
        counters = self._simulator.counters
        return web.json_response(
            {
                "handshakes": counters.handshakes,
                "connections_accepted": counters.connections_accepted,
                "tokens_issued": counters.tokens_issued,
                "token_requests": counters.token_requests,
                "frames_sent": counters.frames_sent,
                "policy_closes": dict(counters.policy_closes),
                "slow_consumer_closes": counters.slow_consumer_closes,
                "close_frames_ignored": counters.close_frames_ignored,
                "token_requests_rate_limited": counters.token_requests_rate_limited,
                "connections": [
                    {
                        "id": info.id,
                        "endpoint": info.endpoint.value,
                        "path": info.path,
                        "contract_ids": sorted(info.contract_ids),
                    }
                    for info in self._simulator.connections
                ],
            }
        )


def _int_param(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def _float_param(request: web.Request, name: str) -> float | None:
    text = request.query.get(name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None


def _bool_param(request: web.Request, name: str, default: bool) -> bool:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be a boolean, got {text!r}")


def _status_param(request: web.Request) -> int | None:
    status = _int_param(request, "status")
    if not status:  # absent or 0: clear the fault
        return None
    if not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status, got {status}")
    return status


def _retry_after_param(request: web.Request) -> int | None:
    seconds = _int_param(request, "retry_after")
    if seconds is not None and seconds < 0:
        raise ValueError(f"retry_after must not be negative, got {seconds}")
    return seconds
