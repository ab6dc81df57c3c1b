"""A local OSS-compatible endpoint for the OSS snapshot store tests, on twisted.web.

It speaks enough of Aliyun OSS for ``oss2.Bucket.put_object`` and for fetching a signed URL:
``PUT /BUCKET/KEY`` (PutObject) and ``GET /BUCKET/KEY`` (GetObject), path-style, which is what
oss2 uses for an IP endpoint such as ``http://127.0.0.1:PORT``.

Every request is authenticated for real with signature V4 (``OSS4-HMAC-SHA256``), recomputed
here from the Aliyun specification with the test's secret: the ``Authorization`` header of
requests oss2 signs, and the ``x-oss-*`` query of signed URLs. A mismatch answers 403 with an
OSS-style XML error, as OSS does. V1 signatures are refused (403), as OSS now refuses them;
see docs/oss.rst for why elevgw signs with V4. The body of a PUT is checked against its
``Content-MD5``, and the answer carries ``x-oss-hash-crc64ecma``, which oss2 checks.

Knobs for the failure tests: ``fail_next(n)`` answers 500 to the next ``n`` requests,
``deny_all`` answers 403 to everything, ``hang`` accepts requests and never answers,
``stop_listening()`` closes the port (connections are then refused), ``public_read`` lets
anonymous GETs through, ``clock_offset`` moves the server's clock (expired URLs, skew).
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import secrets
import time
from typing import Any
from urllib.parse import quote, unquote
from xml.sax.saxutils import escape

import attrs
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.web import resource, server

SIGNATURE_V4 = "OSS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
ALWAYS_SIGNED_HEADERS = ("content-type", "content-md5")
MAX_CLOCK_SKEW = 15 * 60  # seconds, as OSS
MAX_URL_EXPIRY = 7 * 24 * 3600  # V4 signed URLs live at most 7 days


@attrs.frozen
class StoredObject:
    data: bytes
    content_type: str


@attrs.define
class SeenRequest:
    """One request as the server saw it: for tests that count or inspect requests."""

    method: str
    uri: str
    authorization: str | None
    status: int | None = None


class OSSError(Exception):
    """An answer of the OSS error shape: status, OSS code, message, extra XML fields."""

    def __init__(self, status: int, code: str, message: str, **extra: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


class FakeOSS(resource.Resource):
    """One bucket of an OSS region behind one access key; see the module docstring."""

    isLeaf = True

    def __init__(
        self,
        bucket: str,
        access_key_id: str,
        access_key_secret: str,
        region: str,
        now: Any = time.time,
    ) -> None:
        super().__init__()
        self.bucket = bucket
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.region = region
        self._now = now
        self.objects: dict[str, StoredObject] = {}
        self.seen: list[SeenRequest] = []
        self.deny_all = False
        self.hang = False
        self.public_read = False
        self.clock_offset = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._failures_left = 0
        self._hung: list[server.Request] = []
        self._port: Any = None
        self.url = ""
        self._channels: set[Any] = set()

    # -- running it

    async def listen(self, reactor: Any) -> str:
        """Listen on an ephemeral loopback port; return the endpoint URL for oss2."""
        site = server.Site(self)
        site.noisy = False
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self._port = await endpoint.listen(site)
        self.url = "http://127.0.0.1:{}".format(self._port.getHost().port)
        return self.url

    def stop_listening(self) -> Deferred:
        """Die: drop open connections and close the port, so connections are refused."""
        channels, self._channels = self._channels, set()
        for channel in channels:
            if channel.transport is not None:
                channel.transport.abortConnection()
        return self._port.stopListening() if self._port.connected else succeed(None)

    def release_hung(self) -> None:
        """Drop the connections of requests held by ``hang``."""
        hung, self._hung = self._hung, []
        for request in hung:
            request.transport.abortConnection()

    def fail_next(self, count: int) -> None:
        """Answer the next ``count`` requests with 500 InternalError."""
        self._failures_left = count

    def puts(self) -> list[SeenRequest]:
        return [seen for seen in self.seen if seen.method == "PUT"]

    # -- HTTP

    def render(self, request: server.Request) -> bytes | int:
        seen = SeenRequest(
            method=request.method.decode("ascii"),
            uri=request.uri.decode("latin-1"),
            authorization=_header(request, "authorization"),
        )
        self.seen.append(seen)
        self._channels.add(request.channel)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def finished(_: object) -> None:
            self.in_flight -= 1
            seen.status = request.code

        request.notifyFinish().addBoth(finished)
        request.setHeader(b"server", b"AliyunOSS")
        request.setHeader(b"x-oss-request-id", secrets.token_hex(12).upper().encode("ascii"))
        if self.hang:
            self._hung.append(request)
            return server.NOT_DONE_YET
        try:
            return self._handle(request)
        except OSSError as error:
            return self._error(request, error)

    def _handle(self, request: server.Request) -> bytes:
        if self.deny_all:
            raise OSSError(403, "AccessDenied", "You have no right to access this object.")
        if self._failures_left > 0:
            self._failures_left -= 1
            raise OSSError(500, "InternalError", "We encountered an internal error.")
        method = request.method.decode("ascii")
        raw_path, _, raw_query = request.uri.decode("latin-1").partition("?")
        bucket, _, key = unquote(raw_path).lstrip("/").partition("/")
        query = _parse_query(raw_query)
        if bucket != self.bucket:
            raise OSSError(404, "NoSuchBucket", "The specified bucket does not exist.")
        if not key:
            raise OSSError(400, "InvalidObjectName", "The object name is empty.")
        self._authenticate(request, method, bucket, key, query)
        if method == "PUT":
            return self._put_object(request, key)
        if method in ("GET", "HEAD"):
            return self._get_object(request, key)
        raise OSSError(405, "MethodNotAllowed", "The specified method is not allowed.")

    def _put_object(self, request: server.Request, key: str) -> bytes:
        data = request.content.read()
        digest = hashlib.md5(data).digest()
        content_md5 = _header(request, "content-md5")
        if content_md5 is not None and content_md5 != base64.b64encode(digest).decode():
            raise OSSError(400, "InvalidDigest", "The Content-MD5 you specified is not valid.")
        content_type = _header(request, "content-type") or "application/octet-stream"
        self.objects[key] = StoredObject(data, content_type)
        request.setHeader(b"etag", '"{}"'.format(digest.hex().upper()).encode("ascii"))
        request.setHeader(b"content-md5", base64.b64encode(digest))
        request.setHeader(b"x-oss-hash-crc64ecma", str(crc64_ecma(data)).encode("ascii"))
        return b""

    def _get_object(self, request: server.Request, key: str) -> bytes:
        stored = self.objects.get(key)
        if stored is None:
            raise OSSError(404, "NoSuchKey", "The specified key does not exist.", Key=key)
        request.setHeader(b"content-type", stored.content_type.encode("latin-1"))
        request.setHeader(b"etag", '"{}"'.format(hashlib.md5(stored.data).hexdigest().upper()))
        request.setHeader(b"x-oss-hash-crc64ecma", str(crc64_ecma(stored.data)).encode("ascii"))
        return stored.data

    def _error(self, request: server.Request, error: OSSError) -> bytes:
        request.setResponseCode(error.status)
        request.setHeader(b"content-type", b"application/xml")
        request_id = request.responseHeaders.getRawHeaders(b"x-oss-request-id")[0].decode()
        fields = {
            "Code": error.code,
            "Message": error.message,
            "RequestId": request_id,
            "HostId": "127.0.0.1",
            **error.extra,
        }
        body = "".join(
            "<{0}>{1}</{0}>".format(name, escape(value)) for name, value in fields.items()
        )
        xml = '<?xml version="1.0" encoding="UTF-8"?>\n<Error>{}</Error>\n'.format(body)
        return xml.encode("utf-8")

    # -- signature V4

    def _authenticate(
        self,
        request: server.Request,
        method: str,
        bucket: str,
        key: str,
        query: list[tuple[str, str]],
    ) -> None:
        params = dict(query)
        authorization = _header(request, "authorization")
        if authorization is not None:
            self._check_header_signature(request, method, bucket, key, query, authorization)
        elif "x-oss-signature" in params:
            self._check_url_signature(request, method, bucket, key, query)
        elif "Signature" in params or "OSSAccessKeyId" in params:
            raise OSSError(403, "AccessDenied", "Signature V1 is no longer accepted, use V4.")
        elif not (self.public_read and method in ("GET", "HEAD")):
            raise OSSError(403, "AccessDenied", "You have no right to access this object.")

    def _check_header_signature(self, request, method, bucket, key, query, authorization):
        scheme, _, rest = authorization.partition(" ")
        if scheme != SIGNATURE_V4:
            raise OSSError(403, "AccessDenied", "Signature V1 is no longer accepted, use V4.")
        fields = {}
        for part in rest.split(","):
            name, _, value = part.strip().partition("=")
            fields[name] = value
        if "Credential" not in fields or "Signature" not in fields:
            raise OSSError(400, "InvalidArgument", "Authorization lacks Credential or Signature.")
        timestamp = _header(request, "x-oss-date")
        if timestamp is None:
            raise OSSError(403, "AccessDenied", "x-oss-date is required with signature V4.")
        payload_hash = _header(request, "x-oss-content-sha256")
        if payload_hash is None:
            raise OSSError(400, "InvalidArgument", "x-oss-content-sha256 is required.")
        signed_at = self._signing_time(timestamp)
        if abs(self.now() - signed_at) > MAX_CLOCK_SKEW:
            raise OSSError(
                403,
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
            )
        additional = [h for h in fields.get("AdditionalHeaders", "").split(";") if h]
        self._check_signature(
            request, method, bucket, key, query, fields["Credential"], timestamp,
            additional, payload_hash, fields["Signature"],
        )  # fmt: skip

    def _check_url_signature(self, request, method, bucket, key, query):
        params = dict(query)
        if params.get("x-oss-signature-version") != SIGNATURE_V4:
            raise OSSError(400, "InvalidArgument", "x-oss-signature-version must be V4.")
        for needed in ("x-oss-credential", "x-oss-date", "x-oss-expires"):
            if needed not in params:
                raise OSSError(400, "InvalidArgument", "{} is missing.".format(needed))
        try:
            expires = int(params["x-oss-expires"])
        except ValueError:
            raise OSSError(400, "InvalidArgument", "x-oss-expires is not a number.") from None
        if not 0 < expires <= MAX_URL_EXPIRY:
            raise OSSError(400, "InvalidArgument", "x-oss-expires must be 1 to 604800.")
        signed_at = self._signing_time(params["x-oss-date"])
        if self.now() > signed_at + expires:
            raise OSSError(403, "AccessDenied", "Request has expired.")
        if self.now() < signed_at - MAX_CLOCK_SKEW:
            raise OSSError(403, "RequestTimeTooSkewed", "The request is signed in the future.")
        additional = [h for h in params.get("x-oss-additional-headers", "").split(";") if h]
        unsigned_query = [(k, v) for k, v in query if k != "x-oss-signature"]
        self._check_signature(
            request, method, bucket, key, unsigned_query, params["x-oss-credential"],
            params["x-oss-date"], additional, UNSIGNED_PAYLOAD, params["x-oss-signature"],
        )  # fmt: skip

    def _check_signature(
        self, request, method, bucket, key, query, credential, timestamp, additional,
        payload_hash, signature,
    ):  # fmt: skip
        access_key_id, _, scope = credential.partition("/")
        if access_key_id != self.access_key_id:
            raise OSSError(403, "InvalidAccessKeyId", "The OSS Access Key Id does not exist.")
        date, region, product, terminator = (scope.split("/") + ["", "", "", ""])[:4]
        if date != timestamp[:8] or product != "oss" or terminator != "aliyun_v4_request":
            raise OSSError(400, "InvalidArgument", "Malformed credential scope.")
        if region != self.region:
            raise OSSError(400, "InvalidArgument", "Invalid signing region in Authorization.")
        canonical_request = "\n".join(
            [
                method,
                _v4_encode("/{}/{}".format(bucket, key), keep_slashes=True),
                _canonical_query(query),
                _canonical_headers(request, additional),
                ";".join(sorted(additional)),
                payload_hash,
            ]
        )
        string_to_sign = "\n".join(
            [
                SIGNATURE_V4,
                timestamp,
                scope,
                hashlib.sha256(canonical_request.encode()).hexdigest(),
            ]
        )
        signing_key = ("aliyun_v4" + self.access_key_secret).encode()
        for part in (date, region, "oss", "aliyun_v4_request"):
            signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
        expected = hmac.new(signing_key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise OSSError(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
                CanonicalRequest=canonical_request,
                StringToSign=string_to_sign,
            )

    def now(self) -> float:
        return self._now() + self.clock_offset

    def _signing_time(self, timestamp: str) -> float:
        try:
            parsed = time.strptime(timestamp, "%Y%m%dT%H%M%SZ")
        except ValueError:
            raise OSSError(400, "InvalidArgument", "x-oss-date is malformed.") from None
        return float(calendar.timegm(parsed))


def _header(request: server.Request, name: str) -> str | None:
    values = request.requestHeaders.getRawHeaders(name)
    return None if not values else values[0] if isinstance(values[0], str) else values[0].decode()


def _parse_query(raw_query: str) -> list[tuple[str, str]]:
    """Query parameters, percent-decoded but without form semantics (``+`` stays ``+``)."""
    pairs = []
    for item in raw_query.split("&"):
        if item:
            name, _, value = item.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


def _v4_encode(text: str, keep_slashes: bool = False) -> str:
    """RFC 3986 encoding as signature V4 wants it: all but unreserved characters escaped."""
    return quote(text, safe="-_.~" + ("/" if keep_slashes else ""))


def _canonical_query(query: list[tuple[str, str]]) -> str:
    encoded = sorted((_v4_encode(name), _v4_encode(value)) for name, value in query)
    return "&".join(name + "=" + value if value else name for name, value in encoded)


def _canonical_headers(request: server.Request, additional: list[str]) -> str:
    """``x-oss-*``, Content-Type, Content-MD5 and the additional headers, as sent."""
    signed = []
    for raw_name, raw_values in request.requestHeaders.getAllRawHeaders():
        name = raw_name.decode("latin-1").lower()
        if name.startswith("x-oss-") or name in ALWAYS_SIGNED_HEADERS or name in additional:
            signed.append((name, ",".join(v.decode("latin-1").strip() for v in raw_values)))
    return "".join("{}:{}\n".format(name, value) for name, value in sorted(signed))


def _crc64_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xC96C5795D7870F42 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC64_TABLE = _crc64_table()


def crc64_ecma(data: bytes) -> int:
    """CRC-64/XZ (ECMA-182, reflected), the ``x-oss-hash-crc64ecma`` OSS returns."""
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc = _CRC64_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF
