"""A webhook receiver for the suite (tests/suite/webhooks/): verifies every
delivery with the Standard Webhooks reference library (`standardwebhooks` from
PyPI), not runq's own signing code, and logs what it saw.

Prints `PORT <n>` once listening on 127.0.0.1. Control endpoints:
- POST /_config {"path", "secret", "mode", "fail_first", "location"} sets up a
  receiving path. mode: "ok" (200 after `fail_first` 500s), "fail" (always
  500), "hang" (never answers within a minute), "big" (200 with a 10 MB body),
  "redirect" (302 to `location`); "delay_ms" delays every answer.
- GET /_log: every request to a receiving path, in arrival order: path, the
  webhook headers, whether the signature verified (and the library's error if
  not), the status answered, and the body as text.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

ROUTES = {}
LOG = []
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self):
        if self.path == "/_log":
            with LOCK:
                body = json.dumps(LOG).encode()
            self.reply(200, body, [("content-type", "application/json")])
        else:
            self.reply(404)

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        data = self.rfile.read(length)
        if self.path == "/_config":
            config = json.loads(data)
            with LOCK:
                ROUTES[config["path"]] = dict(config, seen=0)
            self.reply(204)
            return
        with LOCK:
            route = ROUTES.get(self.path)
        if route is None:
            self.reply(404)
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        entry = {
            "path": self.path,
            "webhook_id": headers.get("webhook-id"),
            "webhook_timestamp": headers.get("webhook-timestamp"),
            "webhook_signature": headers.get("webhook-signature"),
            "body": data.decode("utf-8", "replace"),
            "at": time.time(),
        }
        try:
            Webhook(route["secret"]).verify(data, headers)
            entry["verified"], entry["error"] = True, None
        except WebhookVerificationError as err:
            entry["verified"], entry["error"] = False, str(err)
        except Exception as err:  # a malformed header: still a rejection
            entry["verified"], entry["error"] = False, repr(err)
        if not entry["verified"]:
            status = 400
        else:
            with LOCK:
                route["seen"] += 1
                seen = route["seen"]
            mode = route.get("mode", "ok")
            if mode == "fail" or (mode == "ok" and seen <= route.get("fail_first", 0)):
                status = 500
            elif mode == "hang":
                status = None
            elif mode == "redirect":
                status = 302
            else:
                status = 200
        entry["status"] = status
        with LOCK:
            LOG.append(entry)
        if status is None:
            time.sleep(60)
            return
        if route.get("delay_ms"):
            time.sleep(route["delay_ms"] / 1000)
        if status == 302:
            self.reply(302, headers=[("location", route.get("location", "/"))])
        elif status == 200 and route.get("mode") == "big":
            self.reply(200, b"x" * (10 * 1024 * 1024))
        else:
            self.reply(status, b"{}", [("content-type", "application/json")])


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a sender that gave up (timeout, killed relay) is expected here


def main():
    server = Server(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
