"""Fault soak: the multi-turn trainer against the fault-injecting proxy for a bounded time, on loopback.

    python scripts/soak.py                      # 4 minutes at a 30% fault rate; prints a table
    python scripts/soak.py --minutes 0.5        # the short variant tests/reliability/test_soak.py runs
    python scripts/soak.py --write              # also rewrite the "Fault soak" figures in docs/reliability.md

The chain, all on 127.0.0.1::

    python -m trainer (configs/intentiongym.yaml, tiny model, generated IntentionGym sample)
      -> FaultProxy (rate 0.3 among 429 / 500 / stall / malformed JSON / dropped connection)
      -> ScoreUpstream (rewrites the judge's reply to {"score": n})
      -> transformers serve (the tiny model)

Why the rewriting hop: the tiny served model cannot write ``{"score": n}``, so without it every judge
call would fail to parse and every episode would be invalid; with it, calls the proxy lets through
score their episode and calls it breaks (after their retries) make it invalid, which is the mix the
soak must keep apart. The policy is the tiny model too, which never calls the IntentionGym tool, so
the API traffic is one ``llm_judge`` call per episode (at temperature 0, so the SQLite cache is used).

While the trainer runs, its RSS, open file descriptors, TCP connections and threads are sampled every
``--interval`` seconds (psutil when installed, else /proc). At the end the trainer gets SIGTERM (it
finishes the step, checkpoints and exits 143) and ``check`` verifies from ``logs/metrics.jsonl`` and
``logs/episodes.jsonl`` that the run kept going, failures/retries/invalid episodes were counted, every
failed call became exactly one invalid episode, no invalid episode carries a reward, and RSS and
descriptor counts stayed flat (first-vs-last-quarter medians and a least-squares slope, from the first
logged step on, so start-up imports do not count as growth).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "intentiongym.yaml"
DOC = REPO / "docs" / "reliability.md"
JUDGE = '[{type: llm_judge, rubric: "Did the assistant ask good questions? {conversation}", weight: 1.0}]'
EPISODES_PER_STEP = 4  # batch_size 2 x group_size 2 (run_overrides)
DOC_BEGIN = "<!-- soak:begin (scripts/soak.py --write) -->"
DOC_END = "<!-- soak:end -->"


# ----------------------------------------------------------------------------- the upstream


class ScoreUpstream:
    """An OpenAI-compatible hop in front of ``transformers serve`` that turns judge replies into scores.

    Every request is forwarded (body, content type and key; the real server parses and answers it); a reply to an
    ``llm_judge`` prompt (its system message asks for ``{"score": ...}``) gets its content replaced by
    ``{"score": n}``, n = a hash of the request body mod 11: deterministic (a greedy call repeated
    gets the same score) and varied (GRPO groups get a signal). Runs on its own loop in a daemon thread.
    """

    def __init__(self, upstream: str, host: str = "127.0.0.1", echo_key_errors: Sequence[int] = ()):
        """``echo_key_errors``: statuses (e.g. 401, 500) for the first requests, answered with an error
        whose message quotes the request's Authorization header, as careless relays do; the secrets
        test uses it to prove such a key never reaches logs or metrics."""
        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = 0
        self.authorizations: list[str] = []  # Authorization headers seen (tests prove the key was sent)
        self._echo = deque(echo_key_errors)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def echo_key_errors(self, *statuses: int) -> None:
        """Answer the next requests with these statuses and a message quoting the key (see ``__init__``)."""
        with self._lock:
            self._echo.extend(statuses)

    def reset(self) -> None:
        """Forget pending ``echo_key_errors`` and the Authorization headers seen (between tests)."""
        with self._lock:
            self._echo.clear()
            self.authorizations.clear()

    def start(self) -> ScoreUpstream:
        # Bound here, so the port is known before the loop runs (as FaultProxy does).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(sock, ready), name="score-upstream", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("score upstream did not start within 10 s")
        return self

    def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def setup() -> None:
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            self._session = ClientSession(timeout=ClientTimeout(total=120))

        self._loop.run_until_complete(setup())
        ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        auth = request.headers.get("Authorization")
        with self._lock:
            if auth is not None:
                self.authorizations.append(auth)
            # Only completions: the run-start probe (GET /models) is not one of the calls a test scripts.
            echo = self._echo.popleft() if self._echo and request.method == "POST" else None
        if echo is not None:
            message = f"Incorrect API key provided: {auth}. Request headers: {dict(request.headers)}"
            return web.json_response(
                {"error": {"message": message, "type": "invalid_request_error", "code": echo}}, status=echo
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        async with self._session.request(
            request.method, self.upstream + request.rel_url.path_qs, data=body, headers=headers
        ) as up:
            payload = await up.read()
            status = up.status
        if status == 200 and b'{\\"score\\"' in body:  # the llm_judge system prompt, JSON-escaped
            reply = json.loads(payload)
            score = int(hashlib.sha256(body).hexdigest(), 16) % 11
            reply["choices"][0]["message"]["content"] = json.dumps({"score": score})
            payload = json.dumps(reply).encode()
        return web.Response(status=status, body=payload, content_type="application/json")

    def stop(self) -> None:
        if self._thread is None:
            return

        async def shutdown() -> None:
            if self._session is not None:
                await self._session.close()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        self._thread = None

    def __enter__(self) -> ScoreUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_overrides(
    work: Path,
    tiny_model: Path,
    api_base: str,
    served_model: str,
    *,
    key_env: str | None = None,
    max_steps: int = 100_000,
    timeout_s: float = 2.0,
    retries: int = 1,
) -> list[str]:
    """``--set`` items pointing configs/intentiongym.yaml at the tiny model, a generated sample and ``api_base``.

    ``key_env``: the variable holding the API key (None: no key; a local server ignores it).
    """
    from trainer.envs.intentiongym_sample import write_sample

    s = write_sample(work / "data", train=8, test=2, seed=0)
    api = [
        f"api_base={api_base}",
        f"model={served_model}",
        f"api_key_env={key_env or 'null'}",
        "extra_body={}",
        "max_tokens=8",
        f"retries={retries}",
        "backoff_s=0.01",
        "max_backoff_s=0.2",
        f"timeout_s={timeout_s}",  # below the proxy's stall, so a stall is a timeout and a retry
        "max_concurrency=4",
    ]
    return [
        f"output_dir={work / 'run'}",
        f"model.path={tiny_model}",
        # The config's laptop profile (its header): the in-process engine, no GPU kept for an SGLang sidecar.
        "rollout.engine=hf",
        "cluster.rollout_gpus_per_node=0",
        "model.gradient_checkpointing=false",
        "algorithm.batch_size=2",
        "algorithm.group_size=2",
        "algorithm.grad_accum=2",
        f"algorithm.max_steps={max_steps}",
        "algorithm.epochs=100000",  # the soak's clock ends the run, not the data (8 rows: 4 steps an epoch)
        f"data.train.path={s['train']}",
        f"data.val.path={s['test']}",
        f"environment.intentions={s['train_intentions']}",
        f"environment.val_intentions={s['test_intentions']}",
        "environment.max_turns=2",
        "environment.max_episode_tokens=1000",
        "rollout.max_new_tokens=8",
        "logging.plots=false",
        "eval.every_epochs=null",  # eval episodes call the API too and would blur the per-step accounting
        "checkpoint.save_every_epochs=null",
        "checkpoint.save_every_steps=20",  # checkpoints open and close files all along the soak
        "checkpoint.keep_last=2",
        f"rewards={JUDGE}",
        *(f"user_simulator.{a}" for a in api),
        *(f"judge.{a}" for a in api),
        "user_simulator.max_invalid_rate=1.0",  # a soak must not stop on its injected failures
    ]


# ----------------------------------------------------------------------------- sampling


@dataclass
class Sample:
    t: float  # seconds since the trainer started
    rss_mb: float
    fds: int
    connections: int  # TCP sockets of the process
    threads: int


def sample_process(pid: int) -> Sample | None:
    """RSS, open descriptors, TCP connections and threads of ``pid``; None once it is gone."""
    try:
        import psutil

        p = psutil.Process(pid)
        with p.oneshot():
            return Sample(
                0.0,
                p.memory_info().rss / 2**20,
                p.num_fds(),
                len(p.net_connections(kind="tcp")),
                p.num_threads(),
            )
    except ImportError:
        return _sample_proc(pid)
    except Exception:  # psutil.NoSuchProcess / AccessDenied: the trainer exited between two samples
        return None


def _sample_proc(pid: int) -> Sample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fd_dir = Path(f"/proc/{pid}/fd")
        links = []
        for fd in os.listdir(fd_dir):
            try:
                links.append(os.readlink(fd_dir / fd))
            except OSError:
                continue  # closed between listdir and readlink
        inodes = {m.group(1) for link in links if (m := re.match(r"socket:\[(\d+)\]", link))}
        tcp = 0
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                tcp += sum(1 for line in f if line.split()[9] in inodes)
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return Sample(0.0, rss, len(links), tcp, threads)
    except (OSError, AttributeError, StopIteration):
        return None


# ----------------------------------------------------------------------------- the soak


@dataclass
class SoakResult:
    minutes: float
    rate: float
    wall_s: float
    exit_code: int | None
    samples: list[Sample]
    steady_from_s: float  # time of the first logged step: samples before it are start-up
    metrics: list[dict[str, Any]]
    episodes: list[dict[str, Any]]
    proxy: dict[str, Any]
    command: str
    stdout_tail: str = ""
    settings: dict[str, Any] = field(default_factory=dict)


def run_soak(
    minutes: float,
    rate: float = 0.3,
    interval_s: float = 2.0,
    work: Path | None = None,
    seed: int = 0,
    say: Any = print,
    tiny_model: Path | None = None,
) -> SoakResult:
    """Start the chain, run the trainer for ``minutes``, SIGTERM it, and collect samples and logs.

    ``tiny_model``: an existing tiny model directory (tests pass theirs); else one is built in ``work``.
    """
    from trainer.testing.fault_proxy import FaultPlan, FaultProxy
    from trainer.testing.serve import TransformersServer
    from trainer.tiny import build_tiny_model

    work = Path(work or tempfile.mkdtemp(prefix="userloop-soak-"))
    tiny = Path(tiny_model) if tiny_model else work / "tiny"
    if not (tiny / "config.json").is_file():
        build_tiny_model(tiny, seed=0)
    plan = FaultPlan(rate=rate, retry_after_s=0.2, stall_s=4.0, seed=seed)
    settings = {
        "fault rate": rate,
        "fault kinds": ", ".join(plan.kinds),
        "client timeout_s / retries": "2 / 1",
        "stall": f"{plan.stall_s:g} s then 504",
        "episodes per step": EPISODES_PER_STEP,
        "judge calls": "1 per episode, temperature 0",
    }
    # The server's port is fixed before it starts, so the hops and the trainer can start while it loads
    # (its ~7 s overlap the trainer's imports, which take longer); it is stopped last, on every path.
    server = TransformersServer(tiny, log_path=work / "serve.log")
    with (
        contextlib.ExitStack() as stack,
        ScoreUpstream(server.root_url) as upstream,
        FaultProxy(upstream.url, plan) as proxy,
    ):
        stack.callback(server.stop)
        args = run_overrides(work, tiny, f"{proxy.url}/v1", server.model)
        cmd = [sys.executable, "-m", "trainer", "--config", str(CONFIG)]
        for a in args:
            cmd += ["--set", a]
        say(f"soak: {minutes:g} min at fault rate {rate:g}; work dir {work}")
        log = (work / "trainer.out").open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        try:
            server.start()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        metrics_path = work / "run" / "logs" / "metrics.jsonl"
        samples: list[Sample] = []
        steady_from: float | None = None
        deadline = t0 + minutes * 60
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                s = sample_process(proc.pid)
                if s is not None:
                    s.t = time.monotonic() - t0
                    samples.append(s)
                if steady_from is None and metrics_path.is_file() and metrics_path.stat().st_size > 0:
                    steady_from = time.monotonic() - t0
                time.sleep(interval_s)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # what a preemption sends: finish the step, checkpoint, 143
            code: int | None = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.monotonic() - t0
        stats = proxy.stats()
    logs = work / "run" / "logs"
    result = SoakResult(
        minutes=minutes,
        rate=rate,
        wall_s=wall,
        exit_code=code,
        samples=samples,
        steady_from_s=steady_from if steady_from is not None else wall,
        metrics=_jsonl(logs / "metrics.jsonl"),
        episodes=_jsonl(logs / "episodes.jsonl"),
        proxy=stats,
        command=f"python scripts/soak.py --minutes {minutes:g} --rate {rate:g}",
        stdout_tail=(work / "trainer.out").read_text(errors="replace")[-3000:],
        settings=settings,
    )
    # The raw figures stay beside the run for a later look (samples, proxy counters).
    raw = {k: v for k, v in vars(result).items() if k not in ("metrics", "episodes")}
    raw["samples"] = [vars(x) for x in result.samples]
    (work / "soak.json").write_text(json.dumps(raw, indent=1, default=str))
    return result


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- analysis


@dataclass
class Trend:
    first: float  # median of the first quarter of the steady samples
    last: float  # median of the last quarter
    slope_per_min: float  # least-squares slope over the steady samples
    peak: float


def trend(samples: list[Sample], attr: str) -> Trend:
    xs = [s.t / 60 for s in samples]
    ys = [float(getattr(s, attr)) for s in samples]
    q = max(1, len(ys) // 4)
    slope = 0.0
    if len(ys) >= 2 and max(xs) > min(xs):
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return Trend(statistics.median(ys[:q]), statistics.median(ys[-q:]), slope, max(ys))


def steady(result: SoakResult) -> list[Sample]:
    return [s for s in result.samples if s.t >= result.steady_from_s]


def check(result: SoakResult, flat: bool = True) -> list[str]:
    """Every invariant the soak must keep, as a list of violations (empty: all held).

    ``flat``: also require RSS and descriptor counts to stay flat (meaningful for a soak of minutes;
    a 30-second run is still warming up).
    """
    problems: list[str] = []
    rows = result.metrics
    steps = [r["step"] for r in rows]
    if len(steps) < 2:
        return [f"the run logged {len(steps)} steps; it did not keep going ({result.stdout_tail[-500:]})"]
    if steps != list(range(steps[0], steps[0] + len(steps))):
        problems.append(f"metrics steps are not contiguous: {steps[:10]}...")
    if result.exit_code != 143:  # 0 would mean it ran out of steps before the soak's time was up
        problems.append(f"the trainer exited {result.exit_code} (expected 143 after the final SIGTERM)")
    last = rows[-1]
    total = len(rows) * EPISODES_PER_STEP
    invalid_total = sum(r["episodes/invalid"] for r in rows)
    if last["episodes/invalid_total"] != invalid_total:
        problems.append(
            f"episodes/invalid_total {last['episodes/invalid_total']} != sum of per-step {invalid_total}"
        )
    # The only API call of an episode is its judge call: calls + cache hits = episodes, and every call
    # that failed after its retries is exactly one invalid episode (none lost, none scored).
    if last["api/calls"] + last["api/cache_hits"] != total:
        problems.append(
            f"api/calls {last['api/calls']} + cache_hits {last['api/cache_hits']} != episodes {total}"
        )
    if last["api/failed"] != invalid_total:
        problems.append(f"api/failed {last['api/failed']} != invalid episodes {invalid_total}")
    if result.rate > 0:
        for key in ("api/failed", "api/retries", "episodes/invalid_total"):
            if not last[key] > 0:
                problems.append(
                    f"{key} is {last[key]} after {len(rows)} steps at a {result.rate:g} fault rate"
                )
    for r in rows:
        if r["episodes/invalid"] == EPISODES_PER_STEP and r["reward/mean"] != 0.0:
            problems.append(f"step {r['step']}: every episode invalid, yet reward/mean {r['reward/mean']}")
        if r["episodes/invalid"] == EPISODES_PER_STEP and r["loss/policy"] != 0:
            problems.append(f"step {r['step']}: every episode invalid, yet loss/policy {r['loss/policy']}")
    for e in result.episodes:
        if e["invalid"] is not None and (e["reward"] is not None or e["parts"].get("llm_judge") is not None):
            problems.append(f"step {e['step']}: an invalid episode has reward {e['reward']} ({e['invalid']})")
        if e["invalid"] is None and e["reward"] is None:
            problems.append(f"step {e['step']}: a valid episode has no reward")
    s = steady(result)
    if flat and len(s) >= 8:
        rss, fds, conns = trend(s, "rss_mb"), trend(s, "fds"), trend(s, "connections")
        if rss.last > rss.first * 1.10 + 30:
            problems.append(
                f"RSS grew from {rss.first:.0f} to {rss.last:.0f} MB (slope {rss.slope_per_min:+.1f} MB/min)"
            )
        if fds.last > fds.first + 8:
            problems.append(f"open descriptors grew from {fds.first:.0f} to {fds.last:.0f}")
        if conns.last > conns.first + 8:
            problems.append(f"TCP connections grew from {conns.first:.0f} to {conns.last:.0f}")
    return problems


def table(result: SoakResult) -> str:
    rows, s = result.metrics, steady(result)
    last = rows[-1] if rows else {}
    out = [
        "| figure | value |",
        "|---|---|",
        f"| soak | {result.minutes:g} min at fault rate {result.rate:g}, trainer wall {result.wall_s:.0f} s, "
        f"exit {result.exit_code} (SIGTERM at the end) |",
        f"| steps logged | {len(rows)} ({rows[0]['step'] if rows else '-'}..{rows[-1]['step'] if rows else '-'}) |",
        f"| episodes / invalid | {len(rows) * EPISODES_PER_STEP} / {last.get('episodes/invalid_total', 0):g} |",
        f"| judge calls / failed / retries / cache hits | {last.get('api/calls', 0):g} / "
        f"{last.get('api/failed', 0):g} / {last.get('api/retries', 0):g} / {last.get('api/cache_hits', 0):g} |",
        f"| proxy requests / faults | {result.proxy.get('requests', 0)} / "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.proxy.get("faults", {}).items()))
        + " |",
    ]
    if len(s) >= 2:
        for attr, label, unit in (
            ("rss_mb", "RSS", "MB"),
            ("fds", "open fds", ""),
            ("connections", "TCP connections", ""),
            ("threads", "threads", ""),
        ):
            tr = trend(s, attr)
            out.append(
                f"| {label}: first / last quarter median, peak, slope | {tr.first:.0f} / {tr.last:.0f} {unit}, "
                f"peak {tr.peak:.0f}, {tr.slope_per_min:+.2f}{(' ' + unit) if unit else ''}/min |"
            )
        out.append(f"| samples (from the first step, t = {result.steady_from_s:.0f} s) | {len(s)} |")
    return "\n".join(out)


def machine() -> str:
    cpus = os.cpu_count()
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = ""
    return f"{platform.system()} {platform.machine()}, {cpus} CPUs{mem}, Python {platform.python_version()}"


def write_doc(result: SoakResult, problems: list[str], path: Path = DOC) -> None:
    """Replace the figures between the soak markers of ``docs/reliability.md`` with this run's."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    settings = "; ".join(f"{k}: {v}" for k, v in result.settings.items())
    block = "\n".join(
        [
            DOC_BEGIN,
            f"Measured {when} on {machine()} (OMP_NUM_THREADS=1, other jobs may have shared the cores), with "
            f"`{result.command}`. Settings: {settings}. Invariants: "
            + ("all held." if not problems else "VIOLATED: " + "; ".join(problems)),
            "",
            table(result),
            DOC_END,
        ]
    )
    text = path.read_text()
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        tail = rest.split(DOC_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=4.0, help="how long the trainer runs (default 4)")
    p.add_argument("--rate", type=float, default=0.3, help="fault probability per request (default 0.3)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples (default 2)")
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a new temporary one)")
    p.add_argument("--write", action="store_true", help="update the figures in docs/reliability.md")
    args = p.parse_args(argv)
    result = run_soak(args.minutes, args.rate, args.interval, args.work)
    problems = check(result)
    print(table(result))
    for line in problems:
        print(f"VIOLATED: {line}")
    if args.write:
        write_doc(result, problems)
        print(f"wrote {DOC}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
