"""Check command lines and request bodies with SGLang 0.5.19's own definitions; run in a subprocess.

``python tests/sglang_pure/check.py JOB.json RESULT.json`` with ``PYTHONPATH=.cache/sglang-0.5.19``
(``scripts/sglang_pure.sh``; ``tests/trainer/test_sglang_contract.py`` drives it). A subprocess because
importing SGLang patches transformers (its ``hf_transformers_patches``), shadows it with SGLang's pinned
release and takes ~10 s: none of that belongs in the test process.

The job: ``{"command_lines": [[flag, ...], ...], "requests": [{"method", "route", "body"}, ...],
"vocab_size": int}``. The answer: one ``{"ok": bool, "error": str}`` per command line
and per request, SGLang's HTTP routes, and the constants of the rules the test double copies.

- A command line goes through what ``sglang.launch_server`` runs before it loads a model:
  ``prepare_server_args`` (SGLang's argparse parser: flags, types, choices), ``ServerArgs.resolve_once`` (the
  resolution pipeline: defaults, the model's config, per-model adjustments) and ``check_server_args`` (the
  launch-time checks, LoRA's among them). ``--device cpu`` is appended: resolution asks the platform for
  its accelerator and there is none here, so device-dependent defaults (memory, chunked prefill) are the CPU
  platform's, not a GPU's. The model path must be a local folder (resolution reads its config).
- A request body is validated as FastAPI does it for the route's handler (pydantic over the io_struct class
  the handler declares), with unknown keys refused (FastAPI drops them silently: a misspelt field would be
  ignored by the real server), then ``/generate`` goes through the tokenizer manager's first steps:
  ``normalize_batch_and_arguments`` and ``SamplingParams(**sampling_params)`` with ``normalize``/``verify``.
- Routes: every ``@app.get/post/api_route`` of ``http_server.py`` (read with ``ast``: importing it needs the
  server's whole runtime), with the handlers that only answer 404 (deprecated routes) marked dead.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shims  # noqa: E402

shims.install()

import msgspec  # noqa: E402
import pydantic  # noqa: E402
from sglang.srt.environ import envs  # noqa: E402
from sglang.srt.lora.utils import get_normalized_target_modules  # noqa: E402
from sglang.srt.managers import io_struct  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import ServerArgs, prepare_server_args  # noqa: E402
from sglang.srt.utils.common import LORA_TARGET_ALL_MODULES, SUPPORTED_LORA_TARGET_MODULES  # noqa: E402

# The io_struct class each POST handler of http_server.py declares for its body.
BODIES = {
    "/generate": io_struct.GenerateReqInput,
    "/update_weights_from_disk": io_struct.UpdateWeightFromDiskReqInput,
    "/load_lora_adapter": io_struct.LoadLoRAAdapterReqInput,
    "/unload_lora_adapter": io_struct.UnloadLoRAAdapterReqInput,
    "/abort_request": io_struct.AbortReq,
}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def check_command_line(argv: list[str]) -> dict[str, Any]:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = prepare_server_args([*argv, "--device", "cpu"])
        args.resolve_once()
        args.check_server_args()
    except SystemExit as e:  # argparse: the message is on stderr
        return {
            "ok": False,
            "error": f"argparse (exit {e.code}): {stderr.getvalue().strip().splitlines()[-1:]}",
        }
    except Exception as e:  # an assertion or ValueError of SGLang's checks
        return {"ok": False, "error": _error(e), "where": traceback.format_exc(limit=-2)}
    return {"ok": True, "error": ""}


def _fields(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return {f.name for f in msgspec.structs.fields(cls)}


def check_request(method: str, route: str, body: Any, vocab_size: int) -> dict[str, Any]:
    cls = BODIES.get(route)
    if method != "POST" or cls is None:
        return {"ok": True, "error": ""}  # no body; the route itself is checked against `routes`
    if not isinstance(body, dict):
        return {"ok": False, "error": f"the body is not a JSON object: {str(body)[:200]}"}
    try:
        unknown = sorted(set(body) - _fields(cls))
        if unknown:
            return {
                "ok": False,
                "error": f"{cls.__name__} has no field(s) {unknown} (FastAPI would drop them)",
            }
        obj = pydantic.TypeAdapter(cls).validate_python(body)
        if route == "/generate":
            obj.normalize_batch_and_arguments()
            params = SamplingParams(**(obj.sampling_params or {}))
            params.normalize(None)
            params.verify(vocab_size)
    except Exception as e:
        return {"ok": False, "error": _error(e)}
    return {"ok": True, "error": ""}


def routes(http_server: Path) -> dict[str, list[str]]:
    """``{"GET /health": [], "GET /get_weight_version": ["dead"], ...}`` from the decorators of http_server.py."""
    out: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(http_server.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        dead = bool(body) and isinstance(body[0], ast.Raise) and "status_code=404" in ast.unparse(body[0])
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)):
                continue
            if not (isinstance(dec.func.value, ast.Name) and dec.func.value.id == "app"):
                continue
            if not (dec.args and isinstance(dec.args[0], ast.Constant)):
                continue  # a route named by an environment variable
            path, kind = dec.args[0].value, dec.func.attr
            methods = [kind.upper()] if kind in ("get", "post", "put", "delete") else []
            for kw in dec.keywords:
                if kw.arg == "methods":
                    methods = [m.value for m in kw.value.elts]  # type: ignore[attr-defined]
            for m in methods:
                out[f"{m} {path}"] = ["dead"] if dead else []
    return out


def health_check_timeout(http_server: Path) -> float:
    """``HEALTH_CHECK_TIMEOUT = int(os.getenv("SGLANG_HEALTH_CHECK_TIMEOUT", 20))``'s default, read from the source."""
    for node in ast.walk(ast.parse(http_server.read_text())):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "HEALTH_CHECK_TIMEOUT":
            return float(next(n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant)
                              and isinstance(n.value, int)))  # fmt: skip
    raise LookupError("HEALTH_CHECK_TIMEOUT not found in http_server.py")


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    import sglang  # the installed copy: its http_server.py is read, not imported

    http_server = Path(sglang.__file__).parent / "srt" / "entrypoints" / "http_server.py"
    defaults = {f.name: f.default for f in dataclasses.fields(ServerArgs)}
    result = {
        "command_lines": [check_command_line(argv) for argv in job.get("command_lines", [])],
        "requests": [
            check_request(r["method"], r["route"], r.get("body"), job.get("vocab_size", 32000))
            for r in job.get("requests", [])
        ],
        "routes": routes(http_server),
        "rules": {
            "supported_lora_target_modules": [*SUPPORTED_LORA_TARGET_MODULES, LORA_TARGET_ALL_MODULES],
            "max_loras_per_batch": defaults["max_loras_per_batch"],
            "normalized": {
                m: sorted(get_normalized_target_modules([m])) for m in SUPPORTED_LORA_TARGET_MODULES
            },
            "health_check_timeout_s": health_check_timeout(http_server),
            "health_generates": envs.SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION.default,
            "request_state_wait_timeout_s": envs.SGLANG_REQUEST_STATE_WAIT_TIMEOUT.default,
        },
    }
    # A file, not stdout: SGLang's import and resolution may print.
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
