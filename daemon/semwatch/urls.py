"""The one way a configured URL is shown: scheme and host, nothing that may be a secret.

Alert URLs (`[notify] urls`) carry their credentials in every part: user and password
(`mailtos://user:pass@host`), the path (`json://host/api/webhooks/TOKEN`, `ntfys://host/topic`),
the query (`?token=`) and, for many apprise schemes, even the place of the host (`tgram://BOT_TOKEN/
chat`, `discord://WEBHOOK_ID/TOKEN`, `ntfy://topic`). apprise's own `url(privacy=True)` masks only
what each plugin knows to be secret, and generic webhooks keep their path. So every log line,
message, console or report that names a URL shows `mask_url(url)` instead: the scheme, and the
host (with its port) only when it has the shape of a host name (a dotted name, `localhost`, an IP
address); anything else in the host's place is hidden, because in those schemes it is a token.
Text that may quote URLs (an exception's message, a library's log line) goes through `mask_urls_in`.
"""

from __future__ import annotations

import ipaddress
import re

HIDDEN = "<hidden>"
NOT_A_URL = "<not a URL>"

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,31}):")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
# A URL inside free text: a scheme, "://", then anything up to white space or a closing quote.
_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s'\"<>]*")


def _host_shaped(host: str) -> bool:
    """A DNS name with at least one dot (or `localhost`), or an IP address: not a token."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    if host.lower() == "localhost":
        return True
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return (len(labels) >= 2 and all(_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit())


def mask_url(url: str) -> str:
    """`scheme://host[:port]` of `url`, or `scheme://<hidden>` when the host's place holds
    something else (a token, nothing), or `<not a URL>`. User, password, path, query and fragment
    are never shown, whatever the scheme."""
    text = url.strip()
    m = _SCHEME.match(text)
    if m is None:
        return NOT_A_URL
    scheme = m.group(1).lower()
    rest = text[m.end():]
    if not rest.startswith("//"):
        return f"{scheme}:{HIDDEN}"  # mailto:someone@example.org, urn:..., no authority
    authority = re.split(r"[/?#\\]", rest[2:], maxsplit=1)[0]
    authority = authority.rpartition("@")[2]  # never the user or password
    if authority.startswith("["):
        close = authority.find("]")
        host, tail = (authority[:close + 1], authority[close + 1:]) if close > 0 else (authority, "")
    else:
        host, _, port_text = authority.partition(":")
        tail = f":{port_text}" if port_text else ""
    port = tail[1:] if tail.startswith(":") else ""
    if not host or not _host_shaped(host):
        return f"{scheme}://{HIDDEN}"
    shown = host.lower()
    if port and _PORT.fullmatch(port):
        shown += f":{port}"
    return f"{scheme}://{shown}"


def mask_urls_in(text: str) -> str:
    """`text` with every `scheme://...` in it replaced by its `mask_url`."""
    return _IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)
