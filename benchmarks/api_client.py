"""API client throughput: calls/s against C/L, the client's CPU per call, and its cost to a busy training loop.

Set-up: ``transformers serve`` on a tiny model on 127.0.0.1 (``trainer.testing.TransformersServer``),
behind a ``FaultProxy`` that adds a fixed latency L to every request. The proxy runs in a process of its
own (``--proxy``), so the client process's CPU time is the client's alone. Calls are what a run makes:
``ProcessApiClient.complete`` (litellm in the API worker process) with ``max_concurrency`` C, awaited on
the run's ``LoopThread``, ``max_tokens=1`` so the server answers fast.

1. Throughput: N = min(400, 6 s x C / L) calls submitted at once; achieved calls/s = N / wall, against
   the ideal C / L (target >= 0.9). The server's own capacity (L = 0, C = 64) is measured too: a setting
   whose C / L comes near it is limited by the server, not by the client.
2. Client CPU per call: the trainer process's CPU time (all threads) and the API worker's, over the calls,
   divided by N.
3. GIL: a training-like loop (forward + backward + AdamW of a small model, Python-heavy like a real
   trainer's loop) in the main thread, timed (a) with no calls in flight, (b) while another *process*
   keeps C calls in flight through the same proxy and server (the server's and proxy's CPU load, no
   GIL sharing), (c) while this process's ``LoopThread`` runs ``ApiClient`` (litellm in this process) with
   the same load, (d) while it runs ``ProcessApiClient`` (the run's client: litellm in the worker).
   (c) / (b) - 1 is what sharing the interpreter with litellm costs the loop, (d) / (b) - 1 what the run's
   client costs it (target <= 5 %). Conditions alternate (a b c d a b c d ...).

    python -m benchmarks.api_client --proxy UPSTREAM --latency L      # the proxy process (internal)
    python -m benchmarks.api_client --load BASE MODEL C N             # the other-process load (internal)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.common import (
    bench_env,
    code_version,
    fmt,
    interleave,
    load_average,
    machine,
    median,
    utc_now,
    versions,
)

HEADING = "## API client throughput"
HI = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class ApiSettings:
    # (L s, C): C / L kept at or below half the server's ~60-100 calls/s on 2 cores, so the client is measured
    settings: tuple[tuple[float, int], ...] = ((1.0, 4), (1.0, 16), (0.5, 16), (2.0, 64))
    window_s: float = 6.0  # N = min(max_calls, window_s * C / L)
    max_calls: int = 400
    rounds: int = 2
    gil_latency_s: float = 1.0
    gil_concurrency: int = 64
    gil_iterations: int = 60  # loop iterations timed per condition
    capacity_calls: int = 200
    model_hidden: int = 64
    loop_hidden: int = 128  # the busy loop's model
    loop_batch: int = 16
    loop_seq: int = 32


FULL = ApiSettings()
QUICK = ApiSettings(settings=((0.2, 4),), window_s=1.0, max_calls=8, rounds=1, gil_latency_s=0.2,
                    gil_concurrency=4, gil_iterations=3, capacity_calls=0, loop_hidden=64, loop_batch=4,
                    loop_seq=8)  # fmt: skip


# ----------------------------------------------------------------------------- helper processes


def _serve_proxy(upstream: str, latency_s: float) -> None:
    from trainer.testing.fault_proxy import FaultPlan, FaultProxy

    with FaultProxy(upstream, FaultPlan(latency_s=latency_s)) as proxy:
        print(proxy.port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


@contextlib.contextmanager
def proxy_process(upstream: str, latency_s: float, env: dict[str, str]):
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.api_client", "--proxy", upstream, "--latency",
                             str(latency_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _client(base: str, model: str, concurrency: int, in_process: bool = False):
    from trainer.config.multiturn import ApiBackendConfig
    from trainer.llm import make_client

    cfg = ApiBackendConfig(model=model, api_base=base, max_tokens=1, temperature=0.7, max_concurrency=concurrency,
                           timeout_s=60, retries=0)  # fmt: skip
    return make_client(cfg, "judge", in_process=in_process)


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of another process so far (0 without one)."""
    if pid is None:
        return 0.0
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _calls(client, n: int) -> list:
    return list(await asyncio.gather(*(client.complete(HI) for _ in range(n))))


def _load(base: str, model: str, concurrency: int, n: int) -> None:
    """Keep ``concurrency`` calls in flight, ``n`` in all (the other-process load of condition (b))."""
    from trainer.llm import LoopThread

    with LoopThread() as loop:
        client = _client(base, model, concurrency)
        loop.run(_calls(client, 2))
        print("ready", flush=True)
        sys.stdin.readline()  # "go"
        loop.run(_calls(client, n))


# ----------------------------------------------------------------------------- measurements


def throughput(loop, base: str, model: str, latency_s: float, concurrency: int, n: int) -> dict:
    client = _client(base, model, concurrency)
    loop.run(_calls(client, min(concurrency, 8)))  # connections and litellm's lazy set-up
    pid = getattr(client, "worker_pid", None)
    c0, w0, t0 = time.process_time(), _cpu_s(pid), time.perf_counter()
    results = loop.run(_calls(client, n))
    wall, cpu, worker = time.perf_counter() - t0, time.process_time() - c0, _cpu_s(pid) - w0
    loop.run(client.aclose())
    ideal = concurrency / latency_s if latency_s else float("nan")
    return {"calls": n, "ok": sum(r.ok for r in results), "calls_per_s": n / wall, "ideal": ideal,
            "cpu_ms_per_call": 1000 * cpu / n, "worker_cpu_ms_per_call": 1000 * worker / n}  # fmt: skip


class BusyLoop:
    """A training-like loop: forward, backward and AdamW of a small Qwen3 model, timed per iteration."""

    def __init__(self, s: ApiSettings, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.ids = torch.randint(0, self.model.config.vocab_size, (s.loop_batch, s.loop_seq))
        self.run(2)

    def run(self, iterations: int) -> float:
        """Median seconds per iteration."""
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return median(times)


def gil(loop, s: ApiSettings, base: str, model: str, busy: BusyLoop, env: dict[str, str], log) -> dict:
    n = s.max_calls

    def idle(_: int) -> float:
        return busy.run(s.gil_iterations)

    def other_process(_: int) -> float:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.api_client", "--load", base, model,
                                 str(s.gil_concurrency), str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(min(0.5, s.gil_latency_s))  # until the first wave is in flight
        t = busy.run(s.gil_iterations)
        running = proc.poll() is None
        proc.stdin.close()
        proc.wait(timeout=120)
        if not running:
            log("api gil: the other-process load ended before the loop did; raise max_calls")
        return t

    clients = {"in": _client(base, model, s.gil_concurrency, in_process=True),
               "worker": _client(base, model, s.gil_concurrency)}  # fmt: skip
    for c in clients.values():
        loop.run(_calls(c, 2))

    def this_process(which: str):
        def run(_: int) -> float:
            fut = loop.submit(_calls(clients[which], n))
            time.sleep(min(0.5, s.gil_latency_s))
            t = busy.run(s.gil_iterations)
            if fut.done():
                log(f"api gil: the {which} load ended before the loop did; raise max_calls")
            fut.result(timeout=120)
            return t

        return run

    runs = interleave({"idle": idle, "other": other_process, "in": this_process("in"),
                       "worker": this_process("worker")}, s.rounds)  # fmt: skip
    for c in clients.values():
        loop.run(c.aclose())
    out = {k: median(v) for k, v in runs.items()}
    out["all"] = {k: [round(x, 4) for x in v] for k, v in runs.items()}
    return out


def bench(s: ApiSettings, threads: int, log=print) -> dict:
    import os

    from trainer.llm import LoopThread
    from trainer.testing.serve import TransformersServer
    from trainer.tiny import build_tiny_model

    env = bench_env(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # this process's busy loop; torch is imported below
    import torch

    torch.set_num_threads(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)  # the server inherits both
    work = Path(tempfile.mkdtemp(prefix="userloop-bench-api-"))
    try:
        build_tiny_model(work / "model", hidden_size=s.model_hidden, layers=2)
        server = TransformersServer(work / "model", log_path=work / "server.log")
        # The server boots (~8 s) while this process builds its busy loop and imports litellm.
        boot = threading.Thread(target=server.start, daemon=True)
        boot.start()
        build_tiny_model(work / "loop-model", hidden_size=s.loop_hidden, layers=2)
        busy = BusyLoop(s, work / "loop-model")
        import trainer.llm.api  # noqa: F401  (litellm: seconds of import)

        boot.join()
        if server.startup_s is None:
            server.stop()
            raise RuntimeError(f"transformers serve did not start:\n{server.log_tail()}")
        rows: list[dict] = []
        capacity: dict = {}
        try:
            with LoopThread() as loop, contextlib.ExitStack() as stack:
                proxies: dict[float, str] = {}

                def proxy(latency: float) -> str:  # one proxy process per latency, reused
                    if latency not in proxies:
                        proxies[latency] = stack.enter_context(proxy_process(server.root_url, latency, env))
                    return proxies[latency]

                if s.capacity_calls:
                    capacity = throughput(loop, proxy(0.0), server.model, 0.0, 64, s.capacity_calls)
                    log(f"api: server capacity {capacity['calls_per_s']:.1f} calls/s")
                for latency, conc in s.settings:
                    n = min(s.max_calls, max(conc, round(s.window_s * conc / latency)))
                    base = proxy(latency)
                    runs = interleave({"client": lambda _r, b=base, lat=latency, c=conc, k=n:
                                       throughput(loop, b, server.model, lat, c, k)}, s.rounds)["client"]  # fmt: skip
                    row = {"latency_s": latency, "concurrency": conc, "calls": n,
                           "calls_per_s": median([r["calls_per_s"] for r in runs]),
                           "cpu_ms_per_call": median([r["cpu_ms_per_call"] for r in runs]),
                           "worker_cpu_ms_per_call": median([r["worker_cpu_ms_per_call"] for r in runs]),
                           "failed": sum(r["calls"] - r["ok"] for r in runs)}  # fmt: skip
                    row["efficiency"] = row["calls_per_s"] / (conc / latency)
                    rows.append(row)
                    log(
                        f"api: L {latency} C {conc}: {row['calls_per_s']:.1f} calls/s of {conc / latency:.1f}"
                    )
                gil_res = gil(loop, s, proxy(s.gil_latency_s), server.model, busy, env, log)
                log(f"api gil: {gil_res}")
        finally:
            server.stop()
        return {"settings": asdict(s), "threads": threads, "capacity": capacity, "rows": rows, "gil": gil_res,
                "machine": machine(), "load": load_average(), "when": utc_now(), "code": code_version()}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def section(res: dict, command_line: str) -> str:
    s = res["settings"]
    g = res["gil"]
    lines = [
        HEADING,
        "",
        f"Measured {res['when']} ({res['code']}) with `{command_line}` (load average at the end {res['load']}).",
        f"Machine: {res['machine']}. {versions('litellm', 'aiohttp', 'transformers', 'torch')}. "
        f"`OMP_NUM_THREADS={res['threads']}` in every process.",
        "",
        "`ProcessApiClient.complete` (what a run uses: litellm in the API worker process) with `max_concurrency` C, "
        "awaited on the run's `LoopThread`, against `transformers "
        f"serve` on a tiny model (hidden {s['model_hidden']}, `max_tokens=1`) on 127.0.0.1 behind a `FaultProxy` (own "
        f"process) adding a fixed latency L to every request. N = min({s['max_calls']}, {s['window_s']:g} s x C / L) "
        f"calls submitted at once, {s['rounds']} interleaved rounds, medians. The server alone (L = 0, C = 64) "
        + (
            f"answers {res['capacity']['calls_per_s']:.0f} calls/s"
            if res["capacity"]
            else "was not measured (quick)"
        )
        + ": settings whose C / L approaches that are server-bound. Client CPU: the CPU time per call of the "
        "trainer process (all its threads) and of the API worker. Target: calls/s >= 0.9 C / L.",
        "",
        "| L (s) | C | calls | C / L (calls/s) | achieved (calls/s) | achieved / (C / L) | server-bound "
        "(calls/s) | achieved / server-bound | trainer CPU per call (ms) | worker CPU per call (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    capacity = res["capacity"].get("calls_per_s", float("nan"))
    for r in res["rows"]:
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        lines.append(f"| {r['latency_s']:g} | {r['concurrency']} | {r['calls']}{failed} | "
                     f"{r['concurrency'] / r['latency_s']:.1f} | {r['calls_per_s']:.1f} | {fmt(r['efficiency'])} | "
                     f"{bound(r, capacity):.1f} | {fmt(r['calls_per_s'] / bound(r, capacity))} | "
                     f"{r['cpu_ms_per_call']:.2f} | {r.get('worker_cpu_ms_per_call', float('nan')):.2f} |")  # fmt: skip
    lines += [
        "",
        "*server-bound*: C / (L + C / capacity). The proxy releases the C calls of a wave together after L, and "
        "`transformers serve` on the CPU answers them one after another, so a wave takes L plus C / capacity; no "
        "client can do better against this server. A ratio to it near 1 means the client adds nothing; the gap "
        "between it and C / L is the server's.",
    ]
    other, inproc = g["other"] / g["idle"] - 1, g["in"] / g["idle"] - 1
    gil_in, gil_worker = g["in"] / g["other"] - 1, g["worker"] / g["other"] - 1
    verdict = "target met" if gil_worker <= 0.05 else "target missed"
    lines += [
        "",
        f"Busy loop in the same process (forward + backward + AdamW of a hidden-{s['loop_hidden']} 2-layer model, "
        f"batch {s['loop_batch']} x {s['loop_seq']} tokens, median of {s['gil_iterations']} iterations per "
        f"condition, {s['rounds']} interleaved rounds) while C = {s['gil_concurrency']} calls with L = "
        f"{s['gil_latency_s']:g} s are in flight:",
        "",
        "| condition | loop iteration (ms) | vs idle |",
        "|---|---:|---:|",
        f"| no calls in flight | {1000 * g['idle']:.1f} | 1.00 |",
        f"| calls from another process (server + proxy load, no GIL sharing) | {1000 * g['other']:.1f} | "
        f"{1 + other:.2f} |",
        f"| litellm on this process's `LoopThread` (`ApiClient`, before issue 6's change) | {1000 * g['in']:.1f} | "
        f"{1 + inproc:.2f} |",
        f"| the run's client: `ProcessApiClient` on this process's `LoopThread`, litellm in the API worker | "
        f"{1000 * g['worker']:.1f} | {g['worker'] / g['idle']:.2f} |",
        "",
        f"Cost to the loop against the same load from another process (condition / other-process - 1): "
        f"litellm in this process **{100 * gil_in:.0f} %**; the run's process client **{100 * gil_worker:.0f} %** "
        f"(target <= 5 %: {verdict}). Per-round medians (s): {g['all']}.",
    ]
    return "\n".join(lines) + "\n"


def bound(row: dict, capacity: float) -> float:
    """Calls/s a perfect client reaches when each wave of C calls waits L and then queues at a serial server."""
    return row["concurrency"] / (row["latency_s"] + row["concurrency"] / capacity)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proxy", metavar="UPSTREAM")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--load", nargs=4, metavar=("BASE", "MODEL", "C", "N"))
    args = ap.parse_args()
    if args.proxy:
        _serve_proxy(args.proxy, args.latency)
    elif args.load:
        base, model, conc, n = args.load
        _load(base, model, int(conc), int(n))
    else:
        ap.error("internal helper: use python -m benchmarks.run --only api")


if __name__ == "__main__":
    main()
