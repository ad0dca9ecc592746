"""The client worker: one long-lived process per device that keeps the base model loaded across rounds.

In a Flower deployment, Flower 1.42 starts a fresh ClientApp process for every message, so a model loaded
there would be loaded again every round. `spearfl client-worker` runs beside the SuperNode and holds a
`ClientHost`; the ClientApp hands each work order to it over HTTP on the loopback interface and relays
the answer. The payload both ways is one safetensors file: the adapter as tensors, the work order (or the
weight and metrics) as JSON in its metadata. Nothing is pickled.

    POST /train    global adapter + {"request": TrainRequest fields}  ->  trained adapter + {"weight", "metrics", "nonce"}
    GET  /health   {"status": "ok", "models_loaded": how many times this worker has loaded a base model}

This module imports neither torch nor Flower at the top, so the per-message ClientApp process that talks to
the worker starts fast; the worker side imports the model code when it starts serving.
With the server's token ($SPEARFL_SERVER_TOKEN or --token; required to listen beyond the loopback), /train needs
`Authorization: Bearer <token>`. A body over `max_body_bytes` gets 413 before it is read, a payload that is not
a spearfl safetensors file 400, and nothing in a payload is ever unpickled. Replies read back are bounded too.
Each connection has its own thread and a socket timeout, and a body is read whole before the work order takes
the worker: a stalled or slow sender holds nothing but its own thread and one of READING_SLOTS reading slots,
and is dropped at its deadline (SOCKET_TIMEOUT_SECONDS + its size at MIN_BYTES_PER_SECOND). One work order runs
at a time (one model); another arriving meanwhile, or a body while every reading slot is taken, gets 503.

TLS: the worker serves https with a certificate and key (`--tls-cert`, `--tls-key`); `exchange` speaks https to
an address written `https://host:port` and verifies the certificate against the CA file $SPEARFL_TLS_CA (the
system's trusted CAs when unset). `host:port` and `http://host:port` stay plain HTTP.
"""

from __future__ import annotations

import hmac
import http.client
import json
import logging
import os
import signal
import ssl
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import safetensors.numpy

from spearfl.errors import UserError

logger = logging.getLogger(__name__)

METADATA_KEY = "spearfl"
HEADER_SIZE_BYTES = 8  # safetensors: little-endian u64 length of the JSON header, then the header
MAX_BODY_BYTES = 1 << 30  # a work order or a reply carries one adapter; the paper setting's is 28 MB
SOCKET_TIMEOUT_SECONDS = 60.0  # the longest a worker waits for the next bytes of a request it is reading
MIN_BYTES_PER_SECOND = 256 * 1024  # a body's deadline: the socket timeout + its size at this rate
READING_SLOTS = 2  # bodies read at once, so at most this many (plus the one running) are in memory
CA_VARIABLE = "SPEARFL_TLS_CA"  # the CA file that https devices' and workers' certificates are verified against


class WorkerError(RuntimeError):
    """The client worker could not be reached, or it failed the request; the message says which and why."""


def pack(arrays: dict[str, np.ndarray], header: dict) -> bytes:
    """Tensors and a JSON-able header as one safetensors payload."""
    return safetensors.numpy.save(arrays, metadata={METADATA_KEY: json.dumps(header)})


def unpack(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """Inverse of `pack`: (tensors, header). Raises ValueError, naming the fault, on anything else."""
    if len(data) < HEADER_SIZE_BYTES:
        raise ValueError("payload too short to be a safetensors file")
    size = int.from_bytes(data[:HEADER_SIZE_BYTES], "little")
    if size > len(data) - HEADER_SIZE_BYTES:
        raise ValueError(f"safetensors header declares {size} bytes, the payload holds {len(data) - HEADER_SIZE_BYTES}")
    try:
        metadata = json.loads(data[HEADER_SIZE_BYTES : HEADER_SIZE_BYTES + size]).get("__metadata__") or {}
        header = json.loads(metadata[METADATA_KEY])
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as error:
        raise ValueError(f"payload has no spearfl header: {type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(header, dict):
        raise ValueError(f"the spearfl header is a {type(header).__name__}, not an object")
    try:
        arrays = safetensors.numpy.load(data)
    except Exception as error:  # the Rust parser's SafetensorError derives from Exception only
        raise ValueError(f"not a valid safetensors payload: {str(error)[:200]}") from None
    return arrays, header


def train_on_worker(
    address: str, arrays: dict[str, np.ndarray], request: dict, token: str | None = None, device: dict | None = None
) -> tuple[dict[str, np.ndarray], dict]:
    """Send one work order to the worker at host:port; returns (trained adapter, {"weight", "metrics", "nonce"}).
    `device`: the device's own settings for a worker started without a config of its own (a simulation)."""
    return exchange(address, "/train", arrays, {"request": request} | ({"device": device} if device else {}), token)


def exchange(
    address: str, path: str, arrays: dict[str, np.ndarray], header: dict, token: str | None = None,
    timeout: float | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """POST a safetensors payload to host:port `path`, read one back (a client worker, or a device service's
    /worker/... routes, with its bearer token). No timeout by default: a client round takes what it takes."""
    headers = {"Content-Type": "application/octet-stream"} | ({"Authorization": f"Bearer {token}"} if token else {})
    connection = open_connection(address, timeout)
    try:
        connection.request("POST", path, body=pack(arrays, header), headers=headers)
        response = connection.getresponse()
        declared = response.getheader("Content-Length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise WorkerError(f"client at {address} answered {path} with a body of {declared} bytes, over the {MAX_BODY_BYTES} limit")
        body = response.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise WorkerError(f"client at {address} answered {path} with over {MAX_BODY_BYTES} bytes")
    except TimeoutError:
        raise WorkerError(f"client at {address} sent no reply to {path} within {timeout:g} s (a straggler)") from None
    except ssl.SSLError as error:
        raise WorkerError(f"client at {address}: TLS failed ({error}); is ${CA_VARIABLE} the CA that signed its certificate?") from None
    except OSError as error:
        raise WorkerError(f"client at {address} unreachable ({error}); is its worker or service running?") from None
    finally:
        connection.close()
    if response.status != 200:
        raise WorkerError(f"client at {address} refused {path} ({response.status}): {error_text(body)}")
    try:
        if response.getheader("Content-Type", "").startswith("application/json"):
            return {}, json.loads(body)
        return unpack(body)
    except (ValueError, RecursionError) as error:
        raise WorkerError(f"client at {address} answered {path} with a malformed payload: {str(error)[:200]}") from None


def open_connection(address: str, timeout: float | None) -> http.client.HTTPConnection:
    """A connection to `host:port`, `http://host:port`, or `https://host:port` (verified against $SPEARFL_TLS_CA)."""
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rstrip("/").rpartition(":")
    if scheme not in ("", "http", "https") or not port.isdigit():
        raise WorkerError(f"bad client address {address!r}: write host:port, http://host:port or https://host:port")
    if scheme == "https":
        return http.client.HTTPSConnection(host, int(port), timeout=timeout, context=client_tls())
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def client_tls() -> ssl.SSLContext:
    """Verification of a device's or worker's certificate (and its name) against $SPEARFL_TLS_CA, else the system's CAs."""
    authority = os.environ.get(CA_VARIABLE) or None
    try:
        return ssl.create_default_context(cafile=authority)
    except (OSError, ssl.SSLError) as error:
        raise WorkerError(f"${CA_VARIABLE}={authority}: not a readable CA file ({error})") from None


def server_tls(certificate: str, key: str) -> ssl.SSLContext:
    """What a worker serves https with."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    return context


def error_text(body: bytes) -> str:
    try:
        value = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    return str(value.get("error") or value.get("detail") or value) if isinstance(value, dict) else str(value)


class WorkerHandler(BaseHTTPRequestHandler):
    """HTTP front of one ClientHost (set on the server as `server.host`)."""

    timeout = SOCKET_TIMEOUT_SECONDS

    def do_GET(self) -> None:
        if self.path == "/health":
            self.reply_json(200, {"status": "ok", "models_loaded": self.server.host.models_loaded})
        else:
            self.reply_json(404, {"error": f"no such path {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/train":
            self.reply_json(404, {"error": f"no such path {self.path}"})
            return
        token = self.server.token
        if token is not None and not hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {token}".encode()):
            self.reply_json(401, {"error": "missing or wrong access token (Authorization: Bearer <token>)"})
            return
        declared = self.headers.get("Content-Length", "")
        if not declared.isdigit():
            self.reply_json(411, {"error": "a work order needs a Content-Length"})
            return
        if int(declared) > self.server.max_body_bytes:
            self.reply_json(413, {"error": f"request body over the {self.server.max_body_bytes}-byte limit"})
            return
        if not self.server.reading.acquire(blocking=False):
            self.reply_json(503, {"error": f"this worker is reading {READING_SLOTS} other work orders; try again"})
            return
        try:
            body = self.read_body(int(declared))
        finally:
            self.server.reading.release()
        if body is None:
            return
        if not self.server.round_lock.acquire(blocking=False):
            self.reply_json(503, {"error": "this worker is running another work order (one model, one round at a time)"})
            return
        try:
            self.run_work_order(body)
        finally:
            self.server.round_lock.release()

    def read_body(self, size: int) -> bytes | None:
        """The request body, or None (the connection dropped) where the sender stalls past the socket timeout or
        is slower than its deadline allows."""
        deadline = time.monotonic() + SOCKET_TIMEOUT_SECONDS + size / MIN_BYTES_PER_SECOND
        parts, remaining = [], size
        try:
            while remaining:
                part = self.rfile.read1(min(remaining, 1 << 20))
                if not part:
                    break
                parts.append(part)
                remaining -= len(part)
                if remaining and time.monotonic() > deadline:
                    break
        except TimeoutError:
            pass
        if remaining:
            logger.warning("%s: dropped a work order whose body stopped or crawled (%d of %d bytes)", self.address_string(), size - remaining, size)
            self.close_connection = True
            return None
        return b"".join(parts)

    def run_work_order(self, body: bytes) -> None:
        try:
            arrays, header = unpack(body)
            request = header["request"]
            if not isinstance(request, dict):
                raise ValueError(f"the work order is a {type(request).__name__}, not an object")
        except (ValueError, KeyError) as error:
            self.reply_json(400, {"error": f"bad work order: {error}"})
            return
        try:
            state, result = self.server.host.train_arrays(arrays, request, header.get("device"))
        except (TypeError, ValueError, KeyError, UserError) as error:  # a work order it cannot run
            self.reply_json(400, {"error": f"bad work order: {type(error).__name__}: {str(error)[:500]}"})
            return
        except Exception as error:  # the round failed: tell the ClientApp why, keep serving
            logger.error("client round failed:\n%s", traceback.format_exc())
            self.reply_json(500, {"error": f"{type(error).__name__}: {error}"})
            return
        self.reply(200, pack(state, result), "application/octet-stream")

    def reply_json(self, status: int, value: dict) -> None:
        self.reply(status, json.dumps(value).encode(), "application/json")

    def reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)


def stop_serving(signal_number, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


def make_server(
    host: str, port: int, client_host, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
    tls: tuple[str, str] | None = None,
) -> ThreadingHTTPServer:
    """An HTTP server in front of `client_host` (anything with ClientHost.train_arrays), a thread per connection;
    port 0 picks a free one; `tls`: (certificate file, key file) to serve https."""
    server = ThreadingHTTPServer((host, port), WorkerHandler)
    server.daemon_threads = True
    if tls is not None:  # the handshake happens in the connection's thread, under its socket timeout
        server.socket = server_tls(*tls).wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.host, server.token, server.max_body_bytes = client_host, token, max_body_bytes
    server.round_lock = threading.Lock()
    server.reading = threading.BoundedSemaphore(READING_SLOTS)
    return server


def serve(host: str, port: int, token: str | None = None, device_config: str | None = None,
          tls: tuple[str, str] | None = None) -> None:
    """Serve client rounds until SIGTERM or Ctrl-C; the model loads with the first round. `device_config`: this
    device's own YAML config (its data, verifiers, privacy and limits; its local DP ledger goes to its output_dir);
    None: each work order's ClientApp names the settings, as in a simulation."""
    from spearfl.runtime.client import (  # the model code, imported only where it runs
        ClientHost,
        Device,
    )

    device = None
    if device_config is not None:
        from spearfl.config import load_config

        own = load_config(device_config)
        device = Device(own, ledger_path=f"{own.output_dir}/privacy-ledger.json")
    server = make_server(host, port, ClientHost(device), token, tls=tls)
    signal.signal(signal.SIGTERM, stop_serving)
    logger.warning("spearfl client worker listening on %s://%s:%d", "https" if tls else "http", *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
