"""The address check behind the feature API's URL fetches, and redirects and the
allowlist over real HTTP on loopback (no traffic leaves the machine)."""

from __future__ import annotations

import http.server
import threading

import pytest

from curate.serve.egress import EgressPolicy, Refused, fetch, why_not_public


@pytest.mark.parametrize("address,kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("fd00:ec2::254", "private"),  # AWS's IPv6 metadata address
    ("169.254.169.254", "link-local"), ("169.254.170.2", "link-local"), ("fe80::1", "link-local"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"),
    ("100.64.0.1", "not public"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"),
])
def test_internal_addresses_are_refused(address, kind):
    assert why_not_public(address).startswith(kind)


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert why_not_public(address) is None


class Server:
    """A loopback HTTP server that counts requests: /hop redirects to `redirect_to`, any
    other path answers `body` (None: a 404 whose reason is `secret`)."""

    def __init__(self, redirect_to: str | None = None, body: bytes | None = b"image bytes",
                 secret: str = "internal secret answer"):
        outer = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                if self.path == "/hop" and redirect_to:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.end_headers()
                    return
                if body is None:
                    self.send_error(404, secret)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_an_allowed_host_is_fetched_and_its_redirects_are_checked_again():
    with Server() as target, Server() as first:
        allow_name = EgressPolicy(allow_hosts=("localhost",))
        assert fetch(f"http://localhost:{first.port}/image", 1000, allow_name) == b"image bytes"
        with pytest.raises(Refused) as no_policy:
            fetch(f"http://localhost:{first.port}/image", 1000, EgressPolicy())
        assert no_policy.value.status == 403
    with Server() as target, Server(redirect_to=f"http://127.0.0.1:{target.port}/image") \
            as first:
        # allowed by name, it redirects to an address the allowlist does not open
        with pytest.raises(Refused, match="resolves to a loopback address"):
            fetch(f"http://localhost:{first.port}/hop", 1000, allow_name)
        assert first.hits == 1 and target.hits == 0
        # a network in the allowlist opens every host in it, redirects included
        allow_net = EgressPolicy(allow_hosts=("127.0.0.0/8",))
        assert fetch(f"http://localhost:{first.port}/hop", 1000, allow_net) == b"image bytes"
        assert target.hits == 1


def test_sizes_schemes_and_upstream_errors_are_refused_plainly():
    allow = EgressPolicy(allow_hosts=("127.0.0.1",))
    with Server() as server:
        with pytest.raises(Refused, match="larger than 4 bytes") as big:
            fetch(f"http://127.0.0.1:{server.port}/image", 4, allow)
        assert big.value.status == 413
    with pytest.raises(Refused, match="only http"):
        fetch("file:///etc/passwd", 1000, allow)
    with pytest.raises(Refused, match="does not resolve"):
        fetch("http://no-such-host.invalid/x", 1000, allow)
    with pytest.raises(Refused) as closed:  # nothing listens there any more
        fetch(f"http://127.0.0.1:{server.port}/image", 1000, allow)
    assert closed.value.status == 502 and "cannot fetch" in str(closed.value)
