"""A small typed Kubernetes REST client over the standard library.

The harness and the test kubelet need a dozen verbs on plain JSON. The official client's models
are untyped and its patch content-type choice varies between releases, so we speak HTTPS directly
and keep everything as dicts.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Obj = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: str) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        try:
            self.message = str(json.loads(body).get("message", body))
        except ValueError:
            self.message = body
        super().__init__(f"{status} {reason}: {self.message}")


@dataclass(frozen=True)
class Credentials:
    server: str
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    token: str | None = None


class KubeApi:
    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        self.creds = creds
        self.timeout = timeout
        url = urllib.parse.urlsplit(creds.server)
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or 443
        self._ctx = ssl.create_default_context(cafile=str(creds.ca_file))
        if creds.cert_file and creds.key_file:
            self._ctx.load_cert_chain(str(creds.cert_file), str(creds.key_file))
        # One keep-alive connection per thread: the kubelet's loops would otherwise pay a TLS
        # handshake on every status patch.
        self._local = threading.local()

    def _conn(self, timeout: float | None) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self._host, self._port, context=self._ctx, timeout=timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _headers(self, content_type: str | None) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": "sluiceway-localcluster"}
        if content_type:
            h["Content-Type"] = content_type
        if self.creds.token:
            h["Authorization"] = f"Bearer {self.creds.token}"
        return h

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        if query:
            path = f"{path}?{urllib.parse.urlencode(query)}"
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (0, 1):
            conn = self._conn(self.timeout)
            try:
                conn.request(method, path, body=data, headers=self._headers(content_type if data else None))
                resp = conn.getresponse()
                raw = resp.read().decode()
                break
            except (http.client.HTTPException, ConnectionError, ssl.SSLError):
                # A kept-alive connection the server closed: reconnect once, then give up.
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        if resp.status >= 400:
            raise ApiError(resp.status, resp.reason, raw)
        if not raw:
            return {}
        try:
            parsed: Obj = json.loads(raw)
        except ValueError:
            # Health endpoints answer plain text ("ok").
            return {"text": raw}
        return parsed

    def get(self, path: str, **query: str) -> Obj:
        return self.request("GET", path, query=query or None)

    def create(self, path: str, body: Mapping[str, Any]) -> Obj:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> Obj:
        # JSON merge patch replaces lists wholesale, which is what status writers want for
        # conditions and containerStatuses.
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def replace(self, path: str, body: Mapping[str, Any]) -> Obj:
        return self.request("PUT", path, body)

    def delete(self, path: str, body: Mapping[str, Any] | None = None) -> Obj:
        return self.request("DELETE", path, body)

    def watch(
        self,
        path: str,
        resource_version: str,
        timeout_seconds: int = 60,
        on_connect: Callable[[socket.socket | None], None] | None = None,
    ) -> Iterator[Obj]:
        """Yield watch events until the server ends the stream (after ``timeout_seconds``).

        ``on_connect`` receives the socket, so another thread can shut it down to end the watch now.
        """
        query = urllib.parse.urlencode(
            {
                "watch": "1",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(timeout_seconds),
            }
        )
        conn = http.client.HTTPSConnection(
            self._host, self._port, context=self._ctx, timeout=timeout_seconds + 15
        )
        try:
            conn.request("GET", f"{path}?{query}", headers=self._headers(None))
            if on_connect is not None:
                on_connect(conn.sock)
            resp = conn.getresponse()
            if resp.status >= 400:
                raise ApiError(resp.status, resp.reason, resp.read().decode())
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()
