"""Which repository URLs git may be pointed at: the transport a URL uses and why one is refused."""

from __future__ import annotations

import re


def repo_transport(url: str) -> str:
    """The git transport ``url`` would use: file, ssh, https, http, git, or a ``x::`` helper."""
    if "::" in url.split("/", 1)[0]:
        return url.split("::", 1)[0]
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
    if m:
        scheme = m.group(1).lower()
        return {"git+ssh": "ssh", "ssh+git": "ssh"}.get(scheme, scheme)
    if re.match(r"[^/]*:", url) and not url.startswith("/"):
        return "ssh"  # scp-like user@host:path
    return "file"


def repo_url_problem(url: str, allowed: tuple[str, ...]) -> str | None:
    """Why git must not be pointed at ``url``, or None."""
    if not url:
        return "is empty"
    if url.startswith("-"):
        return "starts with '-' (git would read it as an option)"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "contains a control character"
    transport = repo_transport(url)
    if transport not in allowed:
        return f"uses transport {transport!r}, which daemon.allowed_protocols does not allow ({', '.join(allowed)})"
    if transport == "ssh":
        m = re.match(r"(?:ssh|git\+ssh|ssh\+git)://(?:[^@/]*@)?([^/:]*)", url, re.IGNORECASE)
        host = m.group(1) if m else url.split(":", 1)[0].rsplit("@", 1)[-1]
        if not host or host.startswith("-"):
            return f"has an invalid host {host!r}"
    return None


def local_repo_path(url: str) -> str | None:
    """The local path a file-transport ``url`` names (``file://`` stripped), else None."""
    if repo_transport(url) != "file":
        return None
    return url[len("file://") :] if url.startswith("file://") else url
