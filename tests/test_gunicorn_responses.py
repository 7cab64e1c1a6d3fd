"""The tracking server's responses leave in one send: header block and first body bytes
together (server/gunicorn.py), so a server killed mid-answer never leaves a cut response."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from gunicorn.http import wsgi
from trackgate.server.gunicorn import send_head_with_body


class _Socket:
    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        file.seek(offset)
        data = file.read(count)
        self.sends.append(data)
        return len(data)


def _response(method: str) -> tuple[Any, _Socket]:
    send_head_with_body()
    sock = _Socket()
    request = SimpleNamespace(version=(1, 1), method=method, headers=[],
                              should_close=lambda: False)
    return wsgi.Response(request, sock, SimpleNamespace(is_ssl=False)), sock


def test_header_and_body_leave_in_one_send() -> None:
    response, sock = _response("POST")
    response.start_response("200 OK", [("Content-Type", "application/json"),
                                       ("Content-Length", "2")])
    response.write(b"{}")
    response.close()
    assert len(sock.sends) == 1, sock.sends
    assert sock.sends[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert sock.sends[0].endswith(b"\r\n\r\n{}")


def test_a_response_without_a_body_still_sends_its_header() -> None:
    response, sock = _response("GET")
    response.start_response("204 No Content", [])
    response.close()
    assert len(sock.sends) == 1 and sock.sends[0].startswith(b"HTTP/1.1 204 No Content\r\n")


def test_a_chunked_response_sends_every_chunk_and_the_end() -> None:
    response, sock = _response("GET")
    response.start_response("200 OK", [("Content-Type", "text/plain")])
    response.write(b"first")
    response.write(b"second")
    response.close()
    joined = b"".join(sock.sends)
    assert b"\r\n\r\n5\r\nfirst\r\n" in joined and joined.endswith(b"6\r\nsecond\r\n0\r\n\r\n")
    assert len(sock.sends) == 3  # header + first chunk together, then the second, then the end


def test_a_file_sent_with_sendfile_follows_its_header(tmp_path: Any) -> None:
    from gunicorn.http.wsgi import FileWrapper

    path = tmp_path / "index.html"
    path.write_bytes(b"<html></html>")
    response, sock = _response("GET")
    response.cfg = SimpleNamespace(is_ssl=False, sendfile=True)
    response.start_response("200 OK", [("Content-Length", "13")])
    with path.open("rb") as file:
        response.write_file(FileWrapper(file))
    response.close()
    joined = b"".join(sock.sends)
    assert joined.startswith(b"HTTP/1.1 200 OK\r\n") and joined.endswith(b"\r\n\r\n<html></html>")
