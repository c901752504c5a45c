"""Started as a new user would, each service either works without what it does not need, or exits
non-zero with one line naming the missing dependency, where it was looked for and the setting to
change — never a traceback. ``rollout --serve-only`` serves the model with no Redis at all.

Real processes (``python -m ...``), a real Redis where one is needed, a closed port where none is.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gd2po.ports import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data/tool_calling/rlla_sft400/train.parquet"


def write_config(tmp_path: Path, **sections) -> Path:
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "startup_timeout": 1},
        "data": {"train_files": [str(DATA)]},
        "rewards": [{"name": "correctness", "url": "http://127.0.0.1:9"}],
        **sections,
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(module: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    # The child inherits the offline environment conftest.py set from gd2po.environment.
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if all(needle in line for needle in needles)]
    assert len(lines) == 1, output
    return lines[0]


def closed_redis() -> str:
    return f"redis://gd2po:hunter2@127.0.0.1:{free_port()}/0"


def test_trainer_without_redis_exits_with_one_line_naming_the_url_and_setting(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    url = closed_redis()
    config = write_config(tmp_path, redis={"url": url}, model={"path": str(tiny_model_dir)})
    started = time.monotonic()
    result = run("trainer", "--config", str(config))
    line = one_error_line(result, "redis.url", "GD2PO_REDIS__URL")
    assert url.replace("hunter2", "***") in line and "hunter2" not in result.stderr
    assert time.monotonic() - started < 120  # bounded wait, no model load first


def test_trainer_without_a_model_folder_names_model_path(tmp_path: Path) -> None:
    config = write_config(tmp_path, model={"path": str(tmp_path / "no-model")})
    result = run("trainer", "--config", str(config))
    assert str(tmp_path / "no-model") in one_error_line(result, "model.path", "GD2PO_MODEL__PATH")


def test_rollout_without_redis_exits_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path, redis={"url": closed_redis()}, model={"path": str(tiny_model_dir)})
    result = run("rollout_service", "--config", str(config), "--port", str(free_port()))
    one_error_line(result, "redis.url", "GD2PO_REDIS__URL")


def test_rollout_without_its_data_file_names_data_train_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(
        tmp_path,
        model={"path": str(tiny_model_dir)},
        data={"train_files": [str(tmp_path / "missing.parquet")]},
    )
    result = run("rollout_service", "--config", str(config), "--port", str(free_port()))
    assert "missing.parquet" in one_error_line(result, "data.train_files", "GD2PO_DATA__TRAIN_FILES")


def test_rollout_without_its_reward_service_names_the_reward_url(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str
) -> None:
    config = write_config(
        tmp_path,
        redis={"url": redis_url},
        model={"path": str(tiny_model_dir), "max_prompt_tokens": 256, "max_response_tokens": 8},
    )
    result = run("rollout_service", "--config", str(config), "--port", str(free_port()))
    assert "http://127.0.0.1:9" in one_error_line(result, "rewards[0].url", "correctness")


def test_reward_service_without_its_checkpoint_exits_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-reward-model"
    result = run(
        "reward_service",
        "--scorer",
        "model.sequence_classifier",
        "--option",
        f"model_path={missing}",
        "--port",
        str(free_port()),
    )
    assert "no Hugging Face checkpoint" in one_error_line(result, str(missing))


def test_serve_only_rollout_serves_the_model_without_redis(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(
        tmp_path,
        redis={"url": closed_redis()},
        model={"path": str(tiny_model_dir), "max_prompt_tokens": 256, "max_response_tokens": 8},
    )
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rollout_service",
            "--config",
            str(config),
            "--serve-only",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve-only rollout never became ready"
            time.sleep(0.5)
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] is not None
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert "Traceback" not in output, output
    assert "not reachable" in output and "hunter2" not in output


def test_a_rollout_starts_while_one_replica_of_a_reward_is_down(caplog: pytest.LogCaptureFixture) -> None:
    """A rollout (re)started — by compose's restart policy, a scale-out or `gd2po up` — while one replica
    of a reward is down must serve, as a running rollout does (the client retries away from it); only a
    reward with no replica answering stops the start, naming every URL tried."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from proto.config import RewardEndpoint
    from proto.startup import StartupError, wait_for_rewards

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    up, down = f"http://127.0.0.1:{server.server_address[1]}", f"http://127.0.0.1:{free_port()}"
    try:
        with caplog.at_level("WARNING", logger="proto.startup"):
            wait_for_rewards([RewardEndpoint(name="correctness", url=[down, up])], timeout=2)
        assert f"1 of 2 replicas do not answer ({down})" in caplog.text
        with pytest.raises(StartupError, match="reward 'correctness': nothing answers at") as refused:
            wait_for_rewards([RewardEndpoint(name="correctness", url=[down, down + "0"])], timeout=1)
        assert down in str(refused.value) and "rewards[0].url" in str(refused.value)
    finally:
        server.shutdown()
        server.server_close()
