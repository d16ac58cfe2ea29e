"""HTTP client for the PGASR service (``serve/app.py``, routes in ``docs/serve.md``).

Standard library only (``urllib``), so it runs anywhere ``pgasr`` is installed::

    from pgasr.client import Client
    c = Client("http://127.0.0.1:8000", api_key=os.environ["PGASR_API_KEY"])
    c.sr_file("lr.nii.gz", "sr.nii.gz", scale=2)   # volume in, volume out
    sr = c.sr_slice(lr_slice, scale=2)             # (h, w) or (3, h, w) -> (h*s, w*s)

and as ``pgasr client sr|slice|info|health`` (:func:`register`). The API key comes from
``--api-key-file``, ``$PGASR_API_KEY`` or ``--api-key`` (visible to other local users in
the process list: prefer the first two).
"""

from __future__ import annotations

import argparse
import gzip
import io
import ipaddress
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["Client", "ServiceError", "register"]

log = logging.getLogger(__name__)
API_KEY_ENV = "PGASR_API_KEY"


class ServiceError(OSError):
    """The service answered with an error (``status`` > 0) or could not be reached (0)."""

    def __init__(self, message: str, status: int = 0, error: str = "", detail: str = ""):
        super().__init__(message)
        self.status, self.error, self.detail = status, error, detail

    def __str__(self) -> str:
        return self.args[0]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Client:
    """A PGASR service at ``url`` (``http(s)://host:port``), authenticated with ``api_key``.

    Args:
        url: base URL of the service.
        api_key: sent as ``X-API-Key`` to ``url`` only (never along a redirect); None for a
            service started with allow_no_auth.
        timeout: seconds per request (a large volume on CPU can take minutes).
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"service URL must be http(s)://host[:port], got {url!r}")
        if u.scheme == "http" and api_key and not _is_loopback(u.hostname):
            log.warning("sending the API key over plain http to %s; use https (TLS at the "
                        "ingress) or an SSH/kubectl tunnel", u.hostname)
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, method: str, path: str, body=None, content_type: str | None = None,
                 length: int | None = None, query: dict | None = None) -> tuple[bytes, dict]:
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        req = urllib.request.Request(url, data=body, method=method)
        if self.api_key:
            # unredirected: urllib copies ordinary headers onto a redirect's request, which
            # would hand the key to whatever host the Location names
            req.add_unredirected_header("X-API-Key", self.api_key)
        if content_type:
            req.add_header("Content-Type", content_type)
        if length is not None:
            req.add_header("Content-Length", str(length))
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                j = json.loads(raw)
                error, detail = str(j.get("error", "")), str(j.get("detail", ""))
            except (ValueError, AttributeError):
                error, detail = "", raw[:300].decode(errors="replace")
            raise ServiceError(f"{method} {path}: HTTP {e.code} {error}: {detail}".rstrip(": "),
                               e.code, error, detail) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServiceError(f"cannot reach {self.url}: {reason}") from None

    def _json(self, path: str) -> dict:
        return json.loads(self._request("GET", path)[0])

    def health(self) -> dict:
        return self._json("/healthz")

    def ready(self) -> dict:
        return self._json("/readyz")

    def model(self) -> dict:
        """``Predictor.describe()`` of the served checkpoint, plus the service's limits."""
        return self._json("/v1/model")

    def sr_volume(self, data: bytes, scale: int) -> bytes:
        """.nii/.nii.gz bytes -> SR .nii.gz bytes."""
        return self._request("POST", "/v1/sr", data, "application/octet-stream",
                             query={"scale": int(scale)})[0]

    def sr_file(self, src: str | Path, dst: str | Path, scale: int) -> Path:
        """Super-resolve NIfTI file ``src`` into ``dst`` (.nii.gz, or .nii uncompressed).
        The upload is streamed from disk; ``dst`` is written atomically."""
        src, dst = Path(src), Path(dst)
        if not (dst.name.endswith(".nii") or dst.name.endswith(".nii.gz")):
            raise ValueError(f"output must end in .nii or .nii.gz: {dst}")
        with open(src, "rb") as f:
            out, _ = self._request("POST", "/v1/sr", f, "application/octet-stream",
                                   length=src.stat().st_size, query={"scale": int(scale)})
        if dst.name.endswith(".nii"):
            out = gzip.decompress(out)
        from pgasr.provenance import atomic_write_bytes

        atomic_write_bytes(dst, out)
        return dst

    def sr_slice(self, lr, scale: int, normalise: bool = True):
        """SR of one slice: ``lr`` is (h, w) or a (3, h, w) triplet (t-1, t, t+1), in any
        units (mapped to model units per request) or already in model units with
        ``normalise=False``.

        Returns:
            (h*scale, w*scale) float32 numpy array.
        """
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(lr, dtype=np.float32), allow_pickle=False)
        out, _ = self._request("POST", "/v1/sr/slice", buf.getvalue(), "application/x-npy",
                               query={"scale": int(scale), "normalise": str(normalise).lower()})
        return np.load(io.BytesIO(out), allow_pickle=False)


# --------------------------------------------------------------------------- CLI


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        text = Path(args.api_key_file).read_text().strip()
        return text.splitlines()[0].strip() if text else None
    return args.api_key or os.environ.get(API_KEY_ENV)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, _api_key(args), timeout=args.timeout)


def _paths(args: argparse.Namespace) -> tuple[str, str]:
    """``--input`` / ``--output`` (or the two positionals), each given once."""
    got = []
    for name in ("input", "output"):
        opt, pos = getattr(args, f"{name}_opt"), getattr(args, name)
        if opt and pos:
            raise ValueError(f"give the {name} once (--{name} or the positional), not both")
        if not (opt or pos):
            raise ValueError(f"--{name} is required")
        got.append(opt or pos)
    return got[0], got[1]


def cmd_sr(args: argparse.Namespace) -> None:
    src, dst = _paths(args)
    out = _client(args).sr_file(src, dst, args.scale)
    print(f"wrote {out}")


def cmd_slice(args: argparse.Namespace) -> None:
    import numpy as np

    src, dst = _paths(args)
    lr = np.load(src, allow_pickle=False)
    sr = _client(args).sr_slice(lr, args.scale, normalise=not args.no_normalise)
    out = Path(dst)
    if out.suffix != ".npy":
        raise ValueError(f"output must end in .npy: {out}")
    np.save(out, sr, allow_pickle=False)
    print(f"wrote {out}  shape={sr.shape}")


def cmd_info(args: argparse.Namespace) -> None:
    print(json.dumps(_client(args).model(), indent=2))


def cmd_health(args: argparse.Namespace) -> None:
    c = _client(args)
    print(json.dumps({"healthz": c.health(), "readyz": c.ready()}, indent=2))


def register(subparsers) -> None:
    """Add ``pgasr client ...`` to the ``pgasr`` CLI (``pgasr.cli._EXTRA_COMMANDS``)."""
    p = subparsers.add_parser("client", help="call a running PGASR HTTP service")
    sub = p.add_subparsers(dest="client_command", required=True)

    def common(sp):
        sp.add_argument("--url", default=os.environ.get("PGASR_URL", "http://127.0.0.1:8000"),
                        help="service base URL (default: $PGASR_URL or http://127.0.0.1:8000)")
        sp.add_argument("--api-key-file", default=None, help="file whose first line is the key")
        sp.add_argument("--api-key", default=None,
                        help=f"the key itself (prefer ${API_KEY_ENV} or --api-key-file: "
                             f"command lines are visible to other local users)")
        sp.add_argument("--timeout", type=float, default=600.0, help="seconds per request")

    def in_out(sp, kind_in: str, kind_out: str) -> None:
        """``--input`` / ``--output`` as in ``pgasr sr``; the two positionals of earlier
        versions still work."""
        sp.add_argument("--input", dest="input_opt", metavar="PATH", help=kind_in)
        sp.add_argument("--output", dest="output_opt", metavar="PATH", help=kind_out)
        sp.add_argument("input", nargs="?", help=argparse.SUPPRESS)
        sp.add_argument("output", nargs="?", help=argparse.SUPPRESS)

    s = sub.add_parser("sr", help="super-resolve a NIfTI volume through the service")
    common(s)
    s.add_argument("--scale", type=int, default=2)
    in_out(s, "LR volume (.nii or .nii.gz)", "SR volume to write (.nii.gz or .nii)")
    s.set_defaults(func=cmd_sr)

    s = sub.add_parser("slice", help="super-resolve one .npy slice (h, w) or triplet (3, h, w)")
    common(s)
    s.add_argument("--scale", type=int, default=2)
    s.add_argument("--no-normalise", action="store_true", help="input is already in model units (pgasr.intensity)")
    in_out(s, "LR slice (.npy)", "SR slice to write (.npy)")
    s.set_defaults(func=cmd_slice)

    s = sub.add_parser("info", help="the served model (GET /v1/model)")
    common(s)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("health", help="GET /healthz and /readyz")
    common(s)
    s.set_defaults(func=cmd_health)
