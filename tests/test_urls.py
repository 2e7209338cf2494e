"""`urls.mask_url`: the one way a URL is shown. Scheme and host only, whatever the scheme; what
stands in the host's place of token schemes (tgram, discord, ntfy without a host...) is hidden.
The same URLs through `notify --test` and a real send's log lines are in test_notify.py."""

from __future__ import annotations

import pytest

from semwatch.urls import HIDDEN, NOT_A_URL, mask_url, mask_urls_in

# (url, what it must show, the secrets it holds). Every scheme docs/OPERATIONS.md, config.toml and
# the README name, the ones issue 18 found leaking, and a few that nothing names.
CASES = [
    ("mailtos://semwatch:s3cretPw@mail.lab.example?to=sem-team@lab.example", "mailtos://mail.lab.example",
     ["semwatch:", "s3cretPw", "sem-team"]),
    ("mailtos://user:passW0rd@example.org", "mailtos://example.org", ["user", "passW0rd"]),
    ("ntfy://ntfy.lab.example/semwatchTopicX", "ntfy://ntfy.lab.example", ["semwatchTopicX"]),
    ("ntfys://ntfy.sh/secret-topic-9", "ntfys://ntfy.sh", ["secret-topic-9"]),
    ("ntfy://bare-secret-topic", f"ntfy://{HIDDEN}", ["bare-secret-topic"]),
    ("json://127.0.0.1:8080/hook", "json://127.0.0.1:8080", ["hook"]),
    ("json://hooks.example.com/api/webhooks/SECRET-TOKEN", "json://hooks.example.com",
     ["SECRET-TOKEN", "webhooks"]),
    ("jsons://u:pw77@hooks.example.com:8443/x?token=QQQ#frag", "jsons://hooks.example.com:8443",
     ["pw77", "QQQ", "frag"]),
    ("form://hooks.example.com/FORMSECRET", "form://hooks.example.com", ["FORMSECRET"]),
    ("xml://10.1.2.3:81/XMLSECRET", "xml://10.1.2.3:81", ["XMLSECRET"]),
    ("gotify://gotify.lab.example/AppTokenG", "gotify://gotify.lab.example", ["AppTokenG"]),
    ("matrix://mxuser:mxpass@matrix.lab.example/!roomid:lab.example", "matrix://matrix.lab.example",
     ["mxuser", "mxpass", "roomid"]),
    ("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ/#general", f"slack://{HIDDEN}",
     ["T1JJ3T3L2", "A1BRTD4JD", "TIiajkdnl", "general"]),
    ("msteams://group@tokA1/tokB2/tokC3/tokD4", f"msteams://{HIDDEN}", ["group", "tokA1", "tokB2", "tokC3"]),
    ("tgram://123456789:AAHbotSecret/-100200300", f"tgram://{HIDDEN}",
     ["123456789", "AAHbotSecret", "100200300"]),
    ("discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js", f"discord://{HIDDEN}",
     ["4174216298", "JHMHI8qBe7"]),
    ("pover://userkeyP@apptokenP", f"pover://{HIDDEN}", ["userkeyP", "apptokenP"]),
    ("mailto:someone.private@example.org", f"mailto:{HIDDEN}", ["someone.private"]),
    ("json:///no/host/PATHSECRET", f"json://{HIDDEN}", ["PATHSECRET"]),
    ("json://[::1]:9464/v6secret", "json://[::1]:9464", ["v6secret"]),
    ("https://user:pw@localhost:8080/hook", "https://localhost:8080", ["pw@", "hook"]),
    ("json://host.example:notaport/x", "json://host.example", ["notaport"]),
    ("not a url at all, my password is hunter2", NOT_A_URL, ["hunter2"]),
    ("", NOT_A_URL, []),
]


@pytest.mark.parametrize(("url", "shown", "secrets"), CASES, ids=[c[0][:30] for c in CASES])
def test_mask_url_shows_scheme_and_host_only(url: str, shown: str, secrets: list[str]) -> None:
    assert mask_url(url) == shown
    for secret in secrets:
        assert secret not in mask_url(url)


def test_urls_inside_text_are_masked() -> None:
    text = ("Max retries exceeded: json://u:pw9@hooks.example.com/api/SECRET1 (then "
            "'tgram://123:BOT2/chat') and ntfys://ntfy.sh/topic3.")
    masked = mask_urls_in(text)
    assert masked.startswith("Max retries exceeded: json://hooks.example.com (then 'tgram://<hidden>')")
    for secret in ("pw9", "SECRET1", "BOT2", "topic3"):
        assert secret not in masked
