"""comfysim stands alone: it imports without Django and runs from a shell with `python -m comfysim`."""

import subprocess
import sys
import time

import httpx

from comfyhub.harness import free_port


def test_it_imports_without_django():
    code = "import sys, comfysim; assert not any(m.split('.')[0] == 'django' for m in sys.modules), 'django'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_python_dash_m_comfysim_serves_until_terminated(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "comfysim", "--port", str(port), "--time-scale", "0", "--output-dir", str(tmp_path),
         "--comfyui-version", "0.3.64"],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                stats = httpx.get(f"http://127.0.0.1:{port}/system_stats", timeout=1).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the simulator did not answer"
                assert process.poll() is None, process.stdout.read().decode()
                time.sleep(0.1)
        assert stats["system"]["comfyui_version"] == "0.3.64"
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0].decode()
    assert process.returncode == 0, output
    assert f"listening on http://127.0.0.1:{port}" in output


def test_bad_arguments_are_refused_with_a_sentence():
    reply = subprocess.run(
        [sys.executable, "-m", "comfysim", "--time-scale", "-1"], capture_output=True, text=True, timeout=30
    )
    assert reply.returncode == 2
    assert "--time-scale must be 0 or more" in reply.stderr


def test_an_unmeasured_comfyui_version_is_refused():
    reply = subprocess.run(
        [sys.executable, "-m", "comfysim", "--comfyui-version", "0.99.0"], capture_output=True, text=True, timeout=30
    )
    assert reply.returncode == 2
    assert "invalid choice: '0.99.0'" in reply.stderr and "0.3.64" in reply.stderr
