"""The web page's API: the run directories under a root, read as the CLI wrote them, and export jobs.

GET /api/runs                 every run under the root: name, state, model, dataset, last step and losses
GET /api/runs/{name}          one run: run.yaml, metrics.jsonl records, answers.json, throughput and memory
POST /api/runs/{name}/export  {"kind": "merge" | "gguf" | "ollama", "type": GGUF type} -> a job id
GET /api/exports/{id}         the job: running / done / failed, its output, and the post-export check

A run is 'finished' once its adapter is saved, 'training' while metrics.jsonl keeps changing, else
'stopped'. Exports run one at a time in a worker thread, into the run's exports/ directory, each followed
by `export.check.check_export`; a run without an adapter (still training) cannot be exported.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fasttune.run_dir import RunDir
from fasttune.serve.protocol import APIError, bad, parse_body, read_body
from fasttune.train.metrics import read_metrics

TRAINING_WITHIN_S = 120  # metrics.jsonl written this recently, no adapter yet: the run is training
EXPORT_KINDS = ("merge", "gguf", "ollama")
GGUF_DEFAULT = "q8_0"
MAX_EXPORT_BODY = 4096  # {"kind": ..., "type": ...}


def run_state(run: RunDir) -> str:
    if run.is_finished():
        return "finished"
    if run.metrics.is_file() and time.time() - run.metrics.stat().st_mtime < TRAINING_WITHIN_S:
        return "training"
    return "stopped"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _field(config: dict[str, Any], section: str, name: str) -> Any:
    """A config value from run.yaml's sections (model, data, ...) or its flat keys."""
    inner = config.get(section)
    if isinstance(inner, dict) and name in inner:
        return inner[name]
    return config.get(name)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Last step, first and last losses, throughput and memory, from metrics.jsonl records."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    speeds = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), int | float)]
    memory = [r["memory_gib"] for r in train if isinstance(r.get("memory_gib"), int | float)]
    return {
        "step": train[-1].get("step") if train else None,
        "loss": train[-1].get("loss") if train else None,
        "first_loss": train[0].get("loss") if train else None,
        "eval_loss": evals[-1].get("eval_loss") if evals else None,
        "first_eval_loss": evals[0].get("eval_loss") if evals else None,
        "exact_match": evals[-1].get("exact_match") if evals else None,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "memory_gib": max(memory) if memory else None,
        "memory_kind": next((r.get("memory_kind") for r in reversed(train) if r.get("memory_kind")), None),
    }


class RunsAPI:
    """The /api routes over the run directories in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.export_lock = threading.Lock()

    def routes(self) -> list[Route]:
        return [
            Route("/api/runs", self.list_runs, methods=["GET"]),
            Route("/api/runs/{name}", self.show_run, methods=["GET"]),
            Route("/api/runs/{name}/export", self.start_export, methods=["POST"]),
            Route("/api/exports/{job}", self.show_export, methods=["GET"]),
        ]

    def _run(self, name: str) -> RunDir:
        """The run directory `name`: a direct child of the root holding run.yaml, else a 404."""
        path = self.root / name
        if "/" in name or "\\" in name or name in ("", ".", "..") or not (path / "run.yaml").is_file():
            raise APIError(404, f"no run '{name}' under {self.root}", param="name", code="run_not_found")
        return RunDir(path)

    async def list_runs(self, request: Request) -> Response:
        runs = []
        if self.root.is_dir():
            for path in sorted(self.root.iterdir()):
                if (path / "run.yaml").is_file():
                    try:
                        runs.append(self._entry(RunDir(path)))
                    except OSError:  # removed while being read
                        continue
        from fasttune.cli.export import GGUF_TYPE_NAMES

        return JSONResponse({"root": str(self.root), "runs": runs, "gguf_types": list(GGUF_TYPE_NAMES),
                             "gguf_default": GGUF_DEFAULT})

    @staticmethod
    def _entry(run: RunDir) -> dict[str, Any]:
        config = _read_yaml(run.run_yaml)
        mtimes = [p.stat().st_mtime for p in (run.run_yaml, run.metrics) if p.exists()]
        return {"name": run.root.name, "state": run_state(run),
                "model": _field(config, "model", "model_name"), "dataset": _field(config, "data", "dataset"),
                "updated": max(mtimes, default=None), **summarize(read_metrics(run.metrics))}

    async def show_run(self, request: Request) -> Response:
        run = self._run(request.path_params["name"])
        records = read_metrics(run.metrics)
        answers = None
        if run.answers.is_file():
            import json

            try:
                answers = json.loads(run.answers.read_text())
            except ValueError:
                answers = None  # being written: the next poll reads it
        return JSONResponse(
            {
                "name": run.root.name,
                "state": run_state(run),
                "config": _read_yaml(run.run_yaml),
                "metrics": records,
                "summary": summarize(records),
                "answers": answers,
                "has_loss_plot": run.loss_plot.is_file(),
            }
        )

    async def start_export(self, request: Request) -> Response:
        run = self._run(request.path_params["name"])
        body = parse_body(await read_body(request, MAX_EXPORT_BODY))
        unknown = set(body) - {"kind", "type"}
        if unknown:
            raise bad(sorted(unknown)[0], f"unsupported parameter '{sorted(unknown)[0]}'")
        kind = body.get("kind")
        if kind not in EXPORT_KINDS:
            raise bad("kind", f"kind must be one of {', '.join(EXPORT_KINDS)}, not {kind!r}")
        qtype = body.get("type", GGUF_DEFAULT)
        if kind == "merge" and "type" in body:
            raise bad("type", "type applies to gguf and ollama exports only")
        from fasttune.cli.export import GGUF_TYPE_NAMES

        if kind != "merge" and qtype not in GGUF_TYPE_NAMES:
            raise bad("type", f"type must be one of {', '.join(GGUF_TYPE_NAMES)}, not {qtype!r}")
        if not run.is_finished():
            raise APIError(
                409,
                f"run '{run.root.name}' has no adapter yet (training has not finished)",
                code="run_not_finished",
            )
        if not self.export_lock.acquire(blocking=False):
            raise APIError(409, "another export is running; wait for it to finish", code="export_busy")
        job = {
            "id": uuid.uuid4().hex[:12],
            "run": run.root.name,
            "kind": kind,
            "type": None if kind == "merge" else qtype,
            "status": "running",
            "started": time.time(),
        }
        self.jobs[job["id"]] = job
        threading.Thread(target=self._export, args=(run, job), daemon=True).start()
        return JSONResponse(job, status_code=202)

    async def show_export(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job"])
        if job is None:
            raise APIError(404, f"no export job '{request.path_params['job']}'", param="job")
        return JSONResponse(job)

    def _export(self, run: RunDir, job: dict[str, Any]) -> None:
        """Write the export, then check it by decoding a held-out prompt from it and from base + adapter."""
        from fasttune.export.check import check_export

        try:
            out_dir = run.exports
            out_dir.mkdir(parents=True, exist_ok=True)
            if job["kind"] == "merge":
                from fasttune.export.merge import merge

                artifact = out = merge(str(run.root), str(out_dir / "merged"))
            elif job["kind"] == "gguf":
                from fasttune.export.gguf import export_gguf

                artifact = out = export_gguf(
                    str(run.root), str(out_dir / f"{job['type']}.gguf"), type=job["type"]
                )
            else:
                from fasttune.export.ollama import export_ollama

                out = export_ollama(str(run.root), str(out_dir / "ollama"), type=job["type"])
                artifact = Path(out).parent / "model.gguf"
            job["output"] = str(out)
            job["status"] = "checking"
            result = check_export(str(run.root), artifact)
            job["check"] = {
                "summary": result.summary(),
                "identical": result.identical,
                "agreement": result.agreement,
                "prompt": result.prompt,
                "exported": result.exported_text,
                "reference": result.reference_text,
            }
            job["status"] = "done"
        except Exception as e:  # reported on the page: the export's own message (ExportError names the cause)
            job["status"], job["error"] = "failed", f"{type(e).__name__}: {e}"
        finally:
            job["seconds"] = round(time.time() - job["started"], 1)
            self.export_lock.release()
