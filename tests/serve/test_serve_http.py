"""`convnext serve --http`: image bytes in, the run's JSON record out, only with the bearer
token (written 0600 beside the socket); loopback unless another address is named."""

from __future__ import annotations

import json
import os
import re
import stat
import urllib.error
import urllib.request
from pathlib import Path

from servers import convnext, runtime_env, socket_of, start

from convnext_cli.serve.web import exposure


def post(url: str, data: bytes, token: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_classify_and_embed(tmp_path: Path, photos, v1_checkpoint):
    env = runtime_env(tmp_path / "run")
    server = start(tmp_path, env, "--idle-timeout", "300", "-m", str(v1_checkpoint),
                   "--http", "127.0.0.1:0", models=1)  # fmt: skip
    try:
        server.wait_for("http on")
        port = int(re.search(r"http on 127\.0\.0\.1:(\d+)", server.log()).group(1))  # type: ignore[union-attr]
        token_file = socket_of(env).parent / "http.token"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        token = token_file.read_text().strip()
        base = f"http://127.0.0.1:{port}"
        image = photos[0].read_bytes()
        query = f"?model={v1_checkpoint}&top_k=3"
        status, record = post(f"{base}/v1/classify{query}", image, token)
        assert status == 200
        cold = convnext("classify", photos[0], "-m", v1_checkpoint, "-k", "3", "--no-server",
                        env=env)  # fmt: skip
        want = json.loads(cold.stdout)
        assert record == {**want, "path": "upload"}
        status, record = post(f"{base}/v1/embed", image, token)
        assert status == 200 and len(record["embedding"]) == 32
        # refused: no token, a wrong one, another route, a model it was not started with
        assert post(f"{base}/v1/classify", image, None)[0] == 401
        assert post(f"{base}/v1/classify", image, token + "x")[0] == 401
        assert post(f"{base}/v1/delete", image, token)[0] == 404
        assert post(f"{base}/v1/classify?model=/etc", image, token)[0] == 400
        assert post(f"{base}/v1/classify?top_k=-4", image, token)[0] == 400
        # not an image: its error record, and the server goes on
        status, record = post(f"{base}/v1/classify", b"\x00" * 100, token)
        assert status == 200 and "error" in record
        assert post(f"{base}/v1/classify", image, token)[0] == 200
    finally:
        server.stop()


def test_only_loopback_is_quiet():
    assert exposure("127.0.0.1") is None and exposure("::1") is None
    assert exposure("localhost") is None
    assert "other machines" in (exposure("0.0.0.0") or "")
    assert "other machines" in (exposure("192.168.1.5") or "")
