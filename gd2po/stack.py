"""``gd2po up``: the whole training stack on one machine, as child processes on 127.0.0.1.

Starts a private Redis (or uses ``GD2PO_REDIS__URL``), every reward service declared with a
``launch`` section (each replica on a free port), the rollout service and the trainer; waits until
each is ready; shows live progress; and stops everything when the trainer finishes, on error, or on
Ctrl-C. The run folder keeps the effective config, each service's log, metrics and checkpoints.

Once the stack is ready it supervises its children (:meth:`Stack.supervise`): a child that crashes —
Redis included — is started again with the same command after a backoff, the trainer with ``--resume``,
until its restart budget is spent (:mod:`gd2po.restart`); every restart is a line of the run's
``restarts.jsonl`` (:mod:`proto.restarts`). A child that fails before the stack is ready stops the run
at once: a bad config or a missing model does not get better by retrying.
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
from gd2po.processes import Child, log_tail
from gd2po.progress import RunReader, RunView, cold_start_progress
from gd2po.redis_server import RedisProcess
from gd2po.restart import CrashHistory, RestartPolicy
from gd2po.runlog import REWARDS_FILE
from proto.audit import AUDIT_DIR
from proto.config import ExperimentConfig, dump_config, load_config, mask_url
from proto.restarts import Restart, append_restart, start_log

READY_TIMEOUT_S = 600.0
log = logging.getLogger("gd2po.stack")
ROLES = {"trainer": "trainer", "rollout_service": "rollout", "reward_service": "reward"}
ROLLOUT = "rollout"  # Service.replica_of of rollout replicas (a reward's is "reward:<name>")


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
class Watch:
    """Restart bookkeeping of one supervised process (a service or the private Redis)."""

    history: CrashHistory = field(default_factory=CrashHistory)
    started_at: float = field(default_factory=time.monotonic)
    """When the current process was started (monotonic seconds): how long it ran sets the backoff."""
    restart_at: float | None = None
    """When a crashed process is due to start again (monotonic seconds); None while none is due."""


@dataclass
class Service:
    child: Child
    ready_url: str | None = None
    replica_of: str | None = None  # "reward:<name>" or ROLLOUT: the run goes on while another replica serves
    watch: Watch = field(default_factory=Watch)


@dataclass
class Stack:
    config_path: Path
    config: ExperimentConfig
    run_dir: Path
    repo_root: Path
    services: list[Service] = field(default_factory=list)
    redis: RedisProcess | None = None
    redis_url: str = ""
    rollout_urls: list[str] = field(default_factory=list)
    trainer_url: str = ""
    pin: dict[str, str] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    resume: bool = False
    lost: list[Service] = field(default_factory=list)
    show_progress: bool = True
    model_override: str | None = None  # the cold start's model, when the config has an sft section
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    redis_watch: Watch = field(default_factory=Watch)

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
        if threads := self.threads.get(role):  # torch and vLLM-CPU size their pools by it
            env = {"OMP_NUM_THREADS": str(threads), **env}  # a caller's own split wins
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
        if self.restart.max_restarts:
            start_log(self.run_dir)  # the trainer counts restarts into metrics.jsonl while it exists
        self._cold_start()
        self._start_redis()
        rewards = self._start_rewards()
        shared = {"GD2PO_REWARDS": json.dumps(rewards)}
        trainer_port = free_port()
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
        self._start_rollouts(shared)
        self._write_manifest()
        self.wait_ready()
        self._write_reward_info(rewards)

    def _start_rollouts(self, shared: dict[str, str]) -> None:
        """``rollout.replicas`` rollout services, each on a free port, named ``rollout`` (one) or
        ``rollout-0``, ``rollout-1``, … They share the prompt order through Redis; several replicas split
        the rollout role's threads between them (each vLLM CPU engine sizes its pool by OMP_NUM_THREADS)."""
        replicas = self.config.rollout.replicas
        threads = self.threads.get("rollout")
        for replica in range(replicas):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = {
                **shared,
                "GD2PO_ROLLOUT__PORT": str(port),
                "GD2PO_ROLLOUT__HOST": "127.0.0.1",
                "GD2PO_ROLLOUT__PRODUCER_ID": f"rollout-{replica}",  # stable across restarts and --resume
            }
            if threads and replicas > 1:
                env["OMP_NUM_THREADS"] = str(max(1, threads // replicas))
            name = "rollout" if replicas == 1 else f"rollout-{replica}"
            self._spawn(
                name,
                "rollout_service",
                [],
                env,
                f"{url}/readyz",
                replica_of=ROLLOUT if replicas > 1 else None,
            )
            self.rollout_urls.append(url)

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
            "redis": (
                {"pid": self.redis.process.pid, "log": str(self.redis.log_path)}
                if self.redis is not None and self.redis.process is not None
                else None  # an external Redis is not ours to watch
            ),
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
        # Replaced, not rewritten in place: a restart rewrites it while operators and tests read it.
        staged = self.run_dir / "services.json.tmp"
        staged.write_text(json.dumps(manifest, indent=2))
        staged.replace(self.run_dir / "services.json")

    def _start_redis(self) -> None:
        external = os.environ.get("GD2PO_REDIS__URL") or os.environ.get("REDIS_URL")
        if external:
            self.redis_url = external
            return
        # Append-only file in the run folder, flushed before each write is acknowledged: streams, ledger
        # and policy key survive `--resume` and a restart after kill -9 (Redis then loses nothing a
        # service was told was written).
        self.redis = RedisProcess(self.run_dir / "redis", appendonly=True, appendfsync="always").start()
        self.redis_url = self.redis.url

    def _start_rewards(self) -> list[dict]:
        """Launch every reward with a ``launch`` section; return the rewards list with real URLs."""
        rewards = []
        audit = (
            {"GD2PO_REWARD_SERVICE_AUDIT_DIR": str(self.run_dir / AUDIT_DIR)} if self.config.run.audit else {}
        )
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
                        audit,
                        f"{url}/readyz",
                        replica_of=f"reward:{reward.name}",
                    )
                    urls.append(url)
                entry["url"] = urls
            rewards.append(entry)
        return rewards

    @staticmethod
    def _finished(service: Service) -> bool:
        """The trainer exited 0: its run is done, which is no death of a service."""
        return service.child.name == "trainer" and service.child.exit_code() == 0

    def check_alive(self) -> None:
        """Raise if a service died — except a replica (of a reward or the rollout) while another serves.
        The start-up check: nothing is restarted before the stack is ready."""
        for service in self.services:
            code = service.child.exit_code()
            if code is None or self._finished(service):
                continue
            self._give_up(service, code)

    def _give_up(self, service: Service, code: int) -> None:
        """Stop the run over a service that exited with ``code`` and will not be restarted — unless it is
        a replica (of a reward or the rollout) and another replica still serves (it is then left out)."""
        if service.replica_of and self._replicas_alive(service.replica_of):
            if service not in self.lost:
                self.lost.append(service)
                log.warning("%s exited with code %d; other replicas keep serving", service.child.name, code)
            return
        raise StackError(self._exit_message(service.child.name, code, service.watch, service.child.log_path))

    def _exit_message(self, name: str, code: int, watch: Watch, log_path: Path) -> str:
        spent = watch.history.restarts
        budget = f" after {spent} restart(s) of {self.restart.max_restarts}" if spent else ""
        return f"{name} exited with code {code}{budget}; last lines of {log_path}:\n{log_tail(log_path)}"

    def supervise(self) -> None:
        """One supervision pass over the running stack: restart each child that crashed (exit code other
        than 0) once its backoff has passed — the trainer with ``--resume`` —, and raise
        :class:`StackError` with its log tail for one whose restart budget is spent (a reward replica
        then drops out while another replica serves, as without restarts). The trainer exiting 0 is
        the run's end, not a crash; another child exiting 0 stops the run, as it always did."""
        if self.redis is not None:
            self._supervise_redis()
        for service in self.services:
            self._supervise_service(service)

    def _crashed(self, name: str, code: int, watch: Watch, log_path: Path) -> bool:
        """Handle a child found exited with ``code``: schedule its restart and log it, returning True, or
        return False when it is not to be restarted (exit 0, or its budget is spent)."""
        now = time.monotonic()
        delay = self.restart.on_crash(watch.history, now - watch.started_at) if code != 0 else None
        if delay is None:
            return False
        watch.restart_at = now + delay
        restart = Restart(
            child=name,
            exit_code=code,
            attempt=watch.history.restarts,
            max_restarts=self.restart.max_restarts,
            delay_s=delay,
        )
        append_restart(self.run_dir, restart)
        with contextlib.suppress(OSError), log_path.open("a") as child_log:  # the restart, in its own log
            child_log.write(
                f"\n--- gd2po up: {name} exited with code {code}; restart {restart.attempt} of "
                f"{restart.max_restarts} in {delay:.1f} s ---\n"
            )
        # The progress view prints the restart from restarts.jsonl; a log line too would print it twice.
        log.info("%s exited with code %d; restart %d of %d in %.1f s", name, code,
                 restart.attempt, restart.max_restarts, delay)  # fmt: skip
        return True

    def _supervise_service(self, service: Service) -> None:
        watch, child = service.watch, service.child
        if watch.restart_at is not None:
            if time.monotonic() >= watch.restart_at:
                self._restart_service(service)
            return
        code = child.exit_code()
        if code is None or (child.name == "trainer" and code == 0) or service in self.lost:
            return
        if not self._crashed(child.name, code, watch, child.log_path):
            self._give_up(service, code)
            return
        child.stop(timeout=2.0)  # what the crash left of its process group (vLLM's engine process)

    def _restart_service(self, service: Service) -> None:
        """Start a crashed service again with the command and environment it had; the trainer resumes
        from its newest checkpoint, with a fresh rendezvous port (the dead one's may still be held)."""
        old = service.child
        command, env = list(old.command), dict(old.env)
        if old.name == "trainer":
            command += [] if "--resume" in command else ["--resume"]
            env.update(single_rank_rendezvous())
        service.child = Child(name=old.name, command=command, log_path=old.log_path, env=env)
        service.child.start(cwd=self.repo_root)
        service.watch.restart_at, service.watch.started_at = None, time.monotonic()
        self._write_manifest()

    def _supervise_redis(self) -> None:
        assert self.redis is not None
        watch = self.redis_watch
        if watch.restart_at is not None:
            if time.monotonic() >= watch.restart_at:
                self._restart_redis()
            return
        code = self.redis.exit_code()
        if code is None:
            return
        if not self._crashed("redis", code, watch, self.redis.log_path):
            raise StackError(self._exit_message("redis", code, watch, self.redis.log_path))

    def _restart_redis(self) -> None:
        """Start the private Redis again on its port and folder: it reloads the append-only file and the
        services' clients reconnect (proto.redis_conn retries). A start that fails is seen as the next
        crash on the following pass."""
        assert self.redis is not None
        old = self.redis
        self.redis = RedisProcess(old.workdir, port=old.port, appendonly=True, appendfsync="always")
        self.redis_watch.restart_at, self.redis_watch.started_at = None, time.monotonic()
        try:
            self.redis.start()
        except (RuntimeError, TimeoutError) as exc:
            log.warning("redis did not come back: %s", exc)
        self._write_manifest()

    def trainer_done(self) -> bool:
        """The trainer exited 0: it reached ``trainer.total_steps`` (or was stopped cleanly)."""
        return self.trainer.exit_code() == 0

    def follow(self, *, show: bool = True, poll_s: float = 0.25, render_s: float = 1.0) -> None:
        """Block until the trainer has finished, supervising the children every ``poll_s`` seconds
        (:meth:`supervise`: restarts, or :class:`StackError` once a child's budget is spent); meanwhile
        the progress view renders a snapshot of the run every ``render_s`` seconds."""
        with (
            RunReader(
                title=f"gd2po · {self.config.run.name} · {self.run_dir}",
                total_steps=self.config.trainer.total_steps,
                run_dir=self.run_dir,
                rollout_urls=self.rollout_urls,
                redis_url=self.redis_url,
                namespace=self.config.redis.namespace,
            ) as reader,
            RunView(show=show) as view,
        ):
            next_render = time.monotonic()
            while not self.trainer_done():
                self.supervise()
                if view.show_anything and time.monotonic() >= next_render:
                    view.show(reader.snapshot(live=view.interactive))
                    next_render = time.monotonic() + render_s
                time.sleep(poll_s)

    def _replicas_alive(self, replica_of: str) -> bool:
        """Another replica of ``replica_of`` (a reward, or the rollout) serves, or is about to (its restart
        is due)."""
        return any(
            s.replica_of == replica_of and (s.child.exit_code() is None or s.watch.restart_at is not None)
            for s in self.services
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        pending = [s for s in self.services if s.ready_url]
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while pending:
                self.check_alive()
                still = []
                for service in pending:
                    if self._finished(service):
                        # A short run can finish between two polls (its /readyz was up only while it
                        # trained): done is past ready.
                        continue
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
    restart: RestartPolicy | None = None,
) -> Path:
    """Run the stack until the trainer finishes; always stop every child. Returns the run folder.

    Without an explicit ``pin``, an asynchronous run splits the cores between rollout and trainer
    (:func:`placement`): pinned with ``auto_pin``, else by thread-pool size only. ``resume`` continues the
    run in ``run_dir`` (its Redis data, newest checkpoint and prompt position) up to trainer.total_steps.
    ``restart`` is when a crashed child is restarted (default: :class:`RestartPolicy`'s on-failure
    backoff and budget; ``max_restarts=0``: never, the crash stops the run)."""
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
        restart=restart or RestartPolicy(),
    )
    with _sigterm_as_interrupt():
        try:
            stack.start()
            stack.follow(show=progress)
            if not stack.restart.max_restarts:
                stack.check_alive()  # without restarts, a crash seen at the very end fails the run too
        finally:
            stack.stop()
    write_report(run_dir, show=progress)
    return run_dir
