"""A small asyncio client of the Janus WebSocket API: one socket, one Janus session, handles on it.

    client = JanusClient("ws://127.0.0.1:8188/", api_secret="...")
    await client.connect()
    handle = await client.attach()                       # janus.plugin.videoroom
    data, jsep = await client.request(handle, {"request": "create", "room": "r1", ...})

Synchronous plugin requests answer with `success`; asynchronous ones (join, publish, start) with `ack`
and later an `event` carrying the same transaction: `request()` hides the difference and raises
JanusError for a Janus or a plugin error. Events that answer nothing (hangup, webrtcup, publishers...)
go to `on_event(handle, message)`. When the socket or the session is lost, every pending request fails
with JanusUnavailable and `on_lost()` runs once; the owner decides whether to reconnect.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any, Callable

import aiohttp

log = logging.getLogger("classmood.janus")

VIDEOROOM = "janus.plugin.videoroom"
Message = dict[str, Any]


class JanusError(Exception):
    """Janus or its plugin refused a request (`code` is Janus's error code)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"Janus error {code}: {reason}")
        self.code = code
        self.reason = reason


class JanusUnavailable(JanusError):
    """The Janus server cannot be reached, or the connection/session to it was lost."""

    def __init__(self, reason: str) -> None:
        super().__init__(0, reason)


class JanusClient:
    def __init__(self, url: str, api_secret: str = "", *, keepalive_seconds: float = 25.0,
                 on_event: Callable[[int, Message], None] | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.url = url
        self.api_secret = api_secret
        self.keepalive_seconds = keepalive_seconds
        self.on_event = on_event
        self.on_lost = on_lost
        self.session_id: int | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._lost = False

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed and not self._lost

    async def connect(self, timeout: float = 5.0) -> None:
        """Open the socket and create a Janus session. Raises JanusUnavailable or JanusError (bad secret)."""
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await asyncio.wait_for(self._http.ws_connect(
                self.url, protocols=["janus-protocol"], max_msg_size=1 << 20, heartbeat=None), timeout)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            await self._http.close()
            self._http = None
            raise JanusUnavailable(f"cannot reach Janus at {self.url} ({exc or type(exc).__name__})") from None
        self._lost = False
        self._tasks = [asyncio.ensure_future(self._reader())]
        try:
            created = await self._call({"janus": "create"}, timeout)
        except BaseException:
            await self.close()
            raise
        self.session_id = int(created["data"]["id"])
        self._tasks.append(asyncio.ensure_future(self._keepalive()))

    async def close(self) -> None:
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._tasks = []
        if self._ws is not None and not self._ws.closed and self.session_id is not None and not self._lost:
            try:
                await self._ws.send_str(json.dumps(self._envelope({"janus": "destroy"})))
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                pass
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        self._ws, self._http, self.session_id = None, None, None
        self._fail_pending("connection to Janus closed")

    # ---- API ----------------------------------------------------------------------------------------
    async def attach(self, plugin: str = VIDEOROOM, timeout: float = 10.0) -> int:
        reply = await self._call({"janus": "attach", "plugin": plugin}, timeout)
        return int(reply["data"]["id"])

    async def detach(self, handle: int, timeout: float = 5.0) -> None:
        """Detach a handle (hangs up its PeerConnection). A handle Janus no longer knows is not an error."""
        try:
            await self._call({"janus": "detach", "handle_id": handle}, timeout)
        except JanusUnavailable:
            raise
        except JanusError as exc:
            log.debug("detach %s: %s", handle, exc)

    async def request(self, handle: int, body: Message, jsep: Message | None = None,
                      timeout: float = 15.0) -> tuple[Message, Message | None]:
        """A plugin request; returns (plugin data, jsep or None). Raises JanusError on any error."""
        message: Message = {"janus": "message", "handle_id": handle, "body": body}
        if jsep is not None:
            message["jsep"] = jsep
        reply = await self._call(message, timeout)
        data = (reply.get("plugindata") or {}).get("data") or {}
        if "error_code" in data:
            raise JanusError(int(data["error_code"]), str(data.get("error", "")))
        return data, reply.get("jsep")

    # ---- transport ----------------------------------------------------------------------------------
    def _envelope(self, message: Message) -> Message:
        message = dict(message)
        if self.api_secret:
            message["apisecret"] = self.api_secret
        if self.session_id is not None and message.get("janus") not in ("create", "info"):
            message["session_id"] = self.session_id
        return message

    async def _call(self, message: Message, timeout: float) -> Message:
        ws = self._ws
        if ws is None or ws.closed or self._lost:
            raise JanusUnavailable(f"not connected to Janus at {self.url}")
        transaction = secrets.token_hex(8)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[transaction] = future
        try:
            await ws.send_str(json.dumps({**self._envelope(message), "transaction": transaction}))
            reply = await asyncio.wait_for(future, timeout)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise JanusUnavailable(f"connection to Janus at {self.url} failed ({exc})") from None
        except asyncio.TimeoutError:
            raise JanusError(408, f"Janus did not answer {message.get('janus')} within {timeout:.0f} s") from None
        finally:
            self._pending.pop(transaction, None)
        if reply.get("janus") == "error":
            error = reply.get("error") or {}
            raise JanusError(int(error.get("code", 0)), str(error.get("reason", "unknown error")))
        return reply

    async def _reader(self) -> None:
        ws = self._ws
        assert ws is not None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                try:
                    message = json.loads(msg.data)
                except ValueError:
                    log.warning("non-JSON message from Janus ignored")
                    continue
                if isinstance(message, dict):
                    self._dispatch(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken socket must fail the requests, not kill the loop silently
            log.warning("reading from Janus failed: %s", exc)
        self._on_lost("Janus closed the connection")

    def _dispatch(self, message: Message) -> None:
        kind = message.get("janus")
        transaction = message.get("transaction")
        if kind == "ack":
            # An asynchronous request was accepted; its answer is a later event with the same transaction.
            # (A keepalive is answered by an ack only.)
            future = self._pending.get(str(transaction))
            if future is not None and not future.done() and self._pending_is_keepalive(str(transaction)):
                future.set_result(message)
            return
        if transaction is not None:
            future = self._pending.get(str(transaction))
            if future is not None and not future.done():
                future.set_result(message)
                return
        if kind == "timeout":
            self._on_lost("Janus timed out the session")
            return
        if self.on_event is not None and message.get("sender") is not None:
            try:
                self.on_event(int(message["sender"]), message)
            except Exception:
                log.exception("handling a Janus event failed")

    def _pending_is_keepalive(self, transaction: str) -> bool:
        return transaction.startswith("ka")

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_seconds)
            ws = self._ws
            if ws is None or ws.closed:
                return
            transaction = "ka" + secrets.token_hex(6)
            future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            self._pending[transaction] = future
            try:
                await ws.send_str(json.dumps({**self._envelope({"janus": "keepalive"}), "transaction": transaction}))
                reply = await asyncio.wait_for(future, 10)
                if reply.get("janus") == "error":   # e.g. 458: the session is gone (Janus restarted)
                    self._on_lost(f"Janus dropped the session ({(reply.get('error') or {}).get('reason')})")
                    return
            except (ConnectionError, RuntimeError, aiohttp.ClientError, asyncio.TimeoutError):
                self._on_lost("Janus stopped answering keepalives")
                return
            finally:
                self._pending.pop(transaction, None)

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(JanusUnavailable(reason))
        self._pending.clear()

    def _on_lost(self, reason: str) -> None:
        if self._lost:
            return
        self._lost = True
        log.warning("lost Janus at %s: %s", self.url, reason)
        self._fail_pending(reason)
        if self.on_lost is not None:
            try:
                self.on_lost()
            except Exception:
                log.exception("on_lost callback failed")
