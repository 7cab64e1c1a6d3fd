"""The login page: plain HTML that works without JavaScript, and where it may send you back."""

from __future__ import annotations

import base64
import hashlib
from html import escape
from urllib.parse import parse_qs, urlencode, urlsplit

STYLE = (
    "body{font-family:system-ui,sans-serif;background:#f5f6f7;margin:0}"
    "main{max-width:22rem;margin:12vh auto;background:#fff;padding:2rem;border-radius:8px;"
    "box-shadow:0 1px 4px #0002}"
    "h1{font-size:1.3rem;margin:0 0 1rem}label{display:block;margin:.8rem 0 .3rem}"
    "input{width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem}"
    "button{margin-top:1.2rem;width:100%;padding:.6rem;font-size:1rem}"
    ".error{background:#fde8e8;color:#8a1c1c;padding:.6rem;border-radius:4px}"
    ".note{background:#e8f4fd;padding:.6rem;border-radius:4px}"
    ".sso{display:block;text-align:center;padding:.6rem;border:1px solid #888;border-radius:4px}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
# The one script: the MLflow UI routes by the URL's #fragment, which browsers never send to a
# server, so it is copied into the form to land on the exact page asked for (without JavaScript
# the login still works and lands on the path).
SCRIPT = b"""(function () {
  if (!location.hash) { return; }
  var next = document.querySelector("input[name=next]");
  if (next && next.value.indexOf("#") < 0) { next.value += location.hash; }
  var sso = document.querySelector("a.sso");
  if (sso) {
    var url = new URL(sso.href);
    var target = url.searchParams.get("next") || "/";
    if (target.indexOf("#") < 0) { url.searchParams.set("next", target + location.hash); }
    sso.href = url.toString();
  }
})();
"""
SCRIPT_PATH = "/_trackgate/login.js"
# Nothing but this page's own style and script; the form posts only back here; never framed.
CSP = (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; script-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def safe_next(target: str | None, base: str = "") -> str:
    """A path on this server to go back to after login; anything else (another host, a scheme,
    `//host`, backslashes browsers read as slashes, control characters) becomes the home page
    (`base`/, base being TRACKGATE_BASE_PATH)."""
    home = base + "/"
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return home
    if any(c in target for c in "\\\r\n\t") or any(ord(c) < 0x20 or ord(c) == 0x7F
                                                   for c in target):
        return home
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return home
    return target


def form_fields(body: bytes) -> dict[str, str]:
    """An application/x-www-form-urlencoded body, first value of each field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


def page(*, next_path: str = "/", username: str = "", error: str | None = None,
         note: str | None = None, provider: str | None = None, passwords: bool = True,
         base: str = "") -> bytes:
    """The login page; `base` (TRACKGATE_BASE_PATH) prefixes every path it names, since the
    browser sees trackgate under it."""
    message = ""
    if error:
        message = f'<p class="error" role="alert">{escape(error)}</p>'
    elif note:
        message = f'<p class="note">{escape(note)}</p>'
    sign_on = ""
    if provider is not None:
        target = f"{base}/login/oidc?" + urlencode({"next": next_path})
        sign_on = (f'<p><a class="sso" href="{escape(target)}">Sign in with '
                   f'{escape(provider)}</a></p>')
        if passwords:
            sign_on += "<p class=\"or\">or with your password:</p>"
    form = f"""<form method="post" action="{base}/login">
<input type="hidden" name="next" value="{escape(next_path)}">
<label for="username">Username</label>
<input id="username" name="username" autocomplete="username" required value="{escape(username)}"
 autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
</form>""" if passwords else ""
    html = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>Sign in - trackgate</title><style>{STYLE}</style></head>
<body><main><h1>Sign in to MLflow</h1>{message}
{sign_on}{form}</main><script src="{base}{SCRIPT_PATH}"></script></body></html>
"""
    return html.encode()
