"""The serve command that `sae-vision trace` and the demo print starts circuit-tracer's own server on the files."""

from __future__ import annotations

import shlex
import subprocess
import time
import urllib.request

from helpers import free_port

from sae_vision_ext.circuits.graph.export import serve_command


def test_printed_serve_command_serves_the_folder(tmp_path):
    (tmp_path / "graph-metadata.json").write_text('{"graphs": []}')
    port = free_port()
    cmd = serve_command(tmp_path, port=port)
    assert str(tmp_path.resolve()) in cmd
    proc = subprocess.Popen(shlex.split(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/graph-metadata.json", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.3)
        assert body == '{"graphs": []}', body
    finally:
        proc.kill()
        proc.wait()
