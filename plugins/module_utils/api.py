# Copyright: NodeFoundry contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one REST client of the NodeFoundry server, shared by the modules and the inventory plugin.

Standard library and ``ansible.module_utils.urls`` only: nothing to install on the controller or
in an execution environment. Every HTTP error becomes ``ApiError`` carrying the server's
``{"error": ...}`` text, which modules turn into ``fail_json(msg=...)``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import re

from ansible.module_utils.basic import env_fallback
from ansible.module_utils.six.moves.urllib.error import HTTPError, URLError
from ansible.module_utils.six.moves.urllib.parse import quote, urlencode
from ansible.module_utils.urls import open_url

# Connection options of every module; the doc fragment nodefoundry.provision.connection documents them.
CONNECTION_ARGS = {
    "url": {"type": "str", "required": True, "fallback": (env_fallback, ["NODEFOUNDRY_URL"])},
    "token": {"type": "str", "required": True, "no_log": True, "fallback": (env_fallback, ["NODEFOUNDRY_TOKEN"])},
    "validate_certs": {"type": "bool", "default": True, "fallback": (env_fallback, ["NODEFOUNDRY_VALIDATE_CERTS"])},
    "timeout": {"type": "int", "default": 30, "fallback": (env_fallback, ["NODEFOUNDRY_TIMEOUT"])},
}

_MAC_FORMS = (
    re.compile(r"^([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})[:-]([0-9a-f]{2})$"),
    re.compile(r"^([0-9a-f]{4})\.([0-9a-f]{4})\.([0-9a-f]{4})$"),
    re.compile(r"^([0-9a-f]{12})$"),
)


# http(s)://host[:port][/path prefix]: no spaces, query or fragment, which the API paths are appended to.
_URL = re.compile(r"^https?://[^/\s?#]+(/[^\s?#]*)?\Z")


class ApiError(Exception):
    """A failed API call; ``str()`` is one line for ``fail_json``."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


def normalize_mac(value):
    """The node identity: 12 lower-case hex digits (``aa:bb:..``, ``aa-bb-..``, ``aabb.ccdd.eeff`` accepted)."""
    text = str(value).strip().lower()
    for form in _MAC_FORMS:
        match = form.match(text)
        if match:
            return "".join(match.groups())
    raise ApiError("invalid MAC address %r: expected aa:bb:cc:dd:ee:ff or 12 hex digits" % (value,))


class Client:
    """Calls ``<url>/api/v1/...`` with a bearer token; returns decoded JSON."""

    def __init__(self, url, token, validate_certs=True, timeout=30):
        if not url:
            raise ApiError("no server URL: set the url option or NODEFOUNDRY_URL")
        if not _URL.match(url):
            raise ApiError("invalid server URL %r: expected http(s)://host[:port]" % (url,))
        if not token:
            raise ApiError("no API token: set the token option or NODEFOUNDRY_TOKEN")
        self.base = url.rstrip("/")
        self.token = token
        self.validate_certs = validate_certs
        self.timeout = timeout

    def request(self, method, path, body=None, query=None, expect=(200,)):
        """One call; ``(status, data, headers)``. Statuses outside ``expect`` raise ApiError."""
        url = self.base + path + ("?" + urlencode(query, doseq=True) if query else "")
        headers = {"Authorization": "Bearer " + self.token, "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            response = open_url(
                url,
                method=method,
                data=data,
                headers=headers,
                validate_certs=self.validate_certs,
                timeout=self.timeout,
                follow_redirects="none",
            )
            status, raw, response_headers = response.getcode(), response.read(), dict(response.headers)
        except HTTPError as exc:
            status, raw, response_headers = exc.code, exc.read(), dict(exc.headers or {})
        except URLError as exc:
            raise ApiError("cannot reach the NodeFoundry server at %s: %s" % (self.base, exc.reason)) from None
        except (OSError, ValueError) as exc:
            raise ApiError("cannot reach the NodeFoundry server at %s: %s" % (self.base, exc)) from None
        payload = _decode(raw)
        if status not in expect:
            raise ApiError(_error_text(method, path, status, payload, response_headers), status)
        return status, payload, response_headers

    # -- nodes --------------------------------------------------------------------------------------------

    def node(self, mac):
        """The node, or None when the server does not know it."""
        try:
            return self.request("GET", "/api/v1/nodes/" + quote(mac))[1]
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def nodes(self, statuses=None):
        """All nodes (newest first), optionally only those with the given statuses, in one request."""
        query = {"status": ",".join(statuses)} if statuses else None
        return self.request("GET", "/api/v1/nodes", query=query)[1] or []

    def create_node(self, fields):
        return self.request("POST", "/api/v1/nodes", body=fields, expect=(201,))[1]

    def update_node(self, mac, fields):
        return self.request("PATCH", "/api/v1/nodes/" + quote(mac), body=fields)[1]

    def delete_node(self, mac):
        self.request("DELETE", "/api/v1/nodes/" + quote(mac), expect=(204,))

    def bulk(self, action, macs, dry_run=False):
        """Install/reinstall many nodes in one transaction; per-MAC results."""
        body = {"action": action, "macs": list(macs), "dry_run": dry_run}
        return self.request("POST", "/api/v1/nodes/bulk", body=body)[1]

    def issue_credentials(self, mac):
        """A fresh broker password for the node and the agent's env file (a new one on every call)."""
        return self.request("POST", "/api/v1/nodes/" + quote(mac) + "/credentials", expect=(200, 201))[1]

    # -- commands -----------------------------------------------------------------------------------------

    def send_commands(self, macs, command, args=None, timeout=None):
        """Queue one command for many nodes in one transaction; per-MAC ``{mac, ok, id | error}``."""
        body = {"macs": list(macs), "command": command, "args": args or {}}
        if timeout is not None:
            body["timeout"] = timeout
        return self.request("POST", "/api/v1/commands", body=body)[1]

    def command(self, command_id):
        return self.request("GET", "/api/v1/commands/" + quote(command_id))[1]


def _decode(raw):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")[:200] if isinstance(raw, bytes) else str(raw)[:200]


def _error_text(method, path, status, payload, headers):
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        reason = payload["error"]
    elif 300 <= status < 400:
        location = {key.lower(): value for key, value in headers.items()}.get("location")
        reason = "redirected to %s (check the url)" % (location,)
    elif payload is None:
        reason = "empty response"
    else:
        reason = "unexpected response %r" % (payload,)
    hint = {401: " (check the token)", 403: " (the token lacks the right role)"}.get(status, "")
    return "%s %s: HTTP %s: %s%s" % (method, path, status, reason, hint)


def client_from_params(params):
    """A Client from a module's (or inventory plugin's) validated options."""
    return Client(params["url"], params["token"], params["validate_certs"], params["timeout"])
