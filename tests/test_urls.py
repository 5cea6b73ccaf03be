"""Network and weight files by URL: downloaded once into the cache (locked, atomic, checked), from a local server."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from networks.discriminator import Discriminator
from networks.generator import Generator
from training.eval import inception
from training.io import weights
from training.io.checkpoint import load_snapshot, save_snapshot
from training.resume import resolve_resume
from training.errors import ResumeError

pytestmark = pytest.mark.usefixtures("ref_ops_one_thread")
ROOT = Path(__file__).resolve().parents[1]


# Serves `routes` (path -> (status, body, declared length or None for len(body), delay in seconds)) on 127.0.0.1
# and counts the requests per path.
class Server:
    def __init__(self):
        self.routes, self.hits = {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                status, body, length, delay = server.routes.get(self.path, (404, b"not found", None, 0))
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)  # fewer bytes than declared: the connection closes after this (HTTP/1.0)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, status: int = 200, length=None, delay: float = 0.0) -> str:
        self.routes[path] = (status, body, length, delay)
        return self.url(path)


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("GANFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GANFORGE_OFFLINE", raising=False)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


# Every file under the cache (lock files and temporaries included).
def cache_files(tmp_path) -> list:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# A tiny unconditional G/D/G_ema snapshot at 16 px, as bytes.
def snapshot_bytes(tmp_path) -> bytes:
    torch.manual_seed(0)
    G = Generator(z_dim=8, c_dim=0, w_dim=8, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
                  synthesis_kwargs=dict(channel_base=64, channel_max=8))
    D = Discriminator(c_dim=0, img_resolution=16, img_channels=3, channel_base=64, channel_max=8,
                      mbstd_group_size=2)
    path = tmp_path / "local" / "snap.safetensors"
    save_snapshot(path, G, D, G, config={"tiny": True})
    return path.read_bytes()


def test_snapshot_by_url_equals_the_local_file_and_downloads_once(server, tmp_path, monkeypatch):
    body = snapshot_bytes(tmp_path)
    url = server.serve("/nets/snap.safetensors", body)
    remote, local = load_snapshot(url), load_snapshot(tmp_path / "local" / "snap.safetensors")
    for name in ("G", "D", "G_ema"):
        a, b = remote[name].state_dict(), local[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert remote["config"] == local["config"] == {"tiny": True}
    cached = weights.url_cache_path(url)
    assert Path(cached).read_bytes() == body and os.path.basename(cached) == "snap.safetensors"
    assert cache_files(tmp_path) == [str(Path(cached).relative_to(tmp_path / "cache"))]  # no lock, no temporary
    load_snapshot(url)
    assert server.hits == {"/nets/snap.safetensors": 1}
    # The same basename at another URL is another cache file; offline, the cached one is still used.
    other = server.serve("/other/snap.safetensors", body)
    assert weights.url_cache_path(other) != cached and weights.fetch(other) != cached
    monkeypatch.setenv("GANFORGE_OFFLINE", "1")
    assert weights.fetch(url) == cached
    # A local path passes through, ~ expanded.
    assert weights.fetch("~/x.safetensors") == os.path.expanduser("~/x.safetensors")


def test_truncated_download_is_an_error_and_leaves_nothing(server, tmp_path):
    url = server.serve("/cut.safetensors", b"x" * 1000, length=5000)
    with pytest.raises(weights.DownloadError) as e:
        weights.fetch(url)
    assert url in str(e.value) and "1000 of 5000 bytes" in str(e.value)
    assert weights.url_cache_path(url) in str(e.value)
    assert cache_files(tmp_path) == []
    # Served whole, it downloads; a temporary left by a killed download of the file is cleared on the way.
    server.serve("/cut.safetensors", b"x" * 5000)
    cached = Path(weights.url_cache_path(url))
    (cached.parent / ".cut.safetensors.0123abcd.tmp").write_bytes(b"partial")
    assert weights.fetch(url) == str(cached) and cached.read_bytes() == b"x" * 5000
    assert cache_files(tmp_path) == [str(cached.relative_to(tmp_path / "cache"))]


def test_http_404_names_the_url_and_status(server, tmp_path):
    url = server.url("/missing.pkl")
    with pytest.raises(weights.DownloadError) as e:
        load_snapshot(url)
    assert url in str(e.value) and "HTTP 404" in str(e.value)
    assert cache_files(tmp_path) == []
    # resume= with the URL: the same error, as a ResumeError.
    with pytest.raises(ResumeError, match="HTTP 404"):
        resolve_resume(url, tmp_path / "run")


def test_sha256_is_checked_on_download_and_on_the_cached_copy(server, tmp_path, monkeypatch):
    body = b"weights" * 100
    good = hashlib.sha256(body).hexdigest()
    url = server.serve("/w.pt", body)
    with pytest.raises(weights.DownloadError) as e:
        weights.fetch(url, sha256="0" * 64)
    assert "0" * 64 in str(e.value) and good in str(e.value) and url in str(e.value)
    assert cache_files(tmp_path) == []
    monkeypatch.setitem(weights.KNOWN_SHA256, url, "deadbeef")  # the table of known files is checked too
    with pytest.raises(weights.DownloadError, match="expected deadbeef"):
        weights.fetch(url)
    monkeypatch.setitem(weights.KNOWN_SHA256, url, good[:8])
    path = weights.fetch(url, sha256=good)
    assert Path(path).read_bytes() == body and server.hits["/w.pt"] == 3
    with pytest.raises(weights.DownloadError, match="cached copy"):  # a cached file that fails its check
        weights.fetch(url, sha256="1" * 64)
    with pytest.raises(ValueError, match="hex"):
        weights.fetch(url, sha256="xyz")


def test_offline_names_the_url_and_the_cache_path(server, tmp_path, monkeypatch):
    url = server.serve("/snap.pkl", b"data")
    monkeypatch.setenv("GANFORGE_OFFLINE", "1")
    for call in (lambda: load_snapshot(url), lambda: weights.fetch(url, allow_download=False)):
        with pytest.raises(weights.DownloadError) as e:
            call()
        assert url in str(e.value) and weights.url_cache_path(url) in str(e.value)
    assert server.hits == {} and cache_files(tmp_path) == []


def test_concurrent_fetches_download_once(server, tmp_path):
    url = server.serve("/slow.safetensors", b"y" * 4096, delay=0.5)
    code = "import sys; from training.io import weights; print(weights.fetch(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    barrier, results, errors = threading.Barrier(2), [], []

    def run():
        barrier.wait()
        try:
            results.append(weights.fetch(url))
        except Exception as e:  # (reported by the assertion below)
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    results += [p.communicate(timeout=30)[0].strip() for p in procs]
    assert errors == [] and results == [weights.url_cache_path(url)] * 4
    assert server.hits == {"/slow.safetensors": 1}
    assert cache_files(tmp_path) == [str(Path(results[0]).relative_to(tmp_path / "cache"))]


def test_resume_url_and_detector_url_share_the_downloader(server, tmp_path):
    url = server.serve("/r/network-snapshot-000004.safetensors", snapshot_bytes(tmp_path))
    plan = resolve_resume(url, tmp_path / "run")
    assert plan == {"kind": "weights", "path": weights.url_cache_path(url), "url": url}
    # metrics.detector=<URL>: fetched by the same code into the cache under its own name.
    det = server.serve("/d/detector.pt", b"not really a detector")
    path = inception.resolve_detector_path(det, cache_dir=str(tmp_path / "cache" / "det"))
    assert path == str(tmp_path / "cache" / "det" / "detector.pt")
    assert inception.resolve_detector_path(det, cache_dir=str(tmp_path / "cache" / "det")) == path
    assert server.hits == {"/r/network-snapshot-000004.safetensors": 1, "/d/detector.pt": 1}
    cut = server.serve("/d/cut.pt", b"z", length=10)
    with pytest.raises(inception.DetectorNotFound, match="1 of 10 bytes"):
        inception.resolve_detector_path(cut, cache_dir=str(tmp_path / "cache" / "det"))


def test_generate_script_with_a_network_url(server, tmp_path):
    url = server.serve("/snap.safetensors", snapshot_bytes(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1", GANFORGE_OPS_IMPL="ref", GANFORGE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--network", url, "--seeds", "3",
                           "--outdir", str(tmp_path / "out"), "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "seed0003.png").is_file() and server.hits == {"/snap.safetensors": 1}
