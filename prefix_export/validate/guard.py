"""The guarded run: a graph that ONNX Runtime cannot run on valid feeds is a failed check, not a crash.

`guarded(runner)` wraps a graph runner (runtime.decoder.OnnxDecoder or OnnxSeq2Seq, or a stand-in with
the same methods) so that whatever its session raises becomes `GraphRunFailed`; `record_failure`
turns that into the report's problem line, naming the stage that was running. Every validator uses it.
"""
from __future__ import annotations

# The runner methods that run a session (what each validator and the decode loop call).
_RUN_METHODS = ("run", "run_graph", "encode", "decode")


class GraphRunFailed(Exception):
    pass


class Guarded:
    """A proxy for a graph runner: its session runs raise GraphRunFailed; `stage` says which check ran."""

    def __init__(self, runner):
        self._runner = runner
        self.stage = "prefill"

    def __getattr__(self, name):
        attribute = getattr(self._runner, name)
        if name not in _RUN_METHODS:
            return attribute

        def run(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                raise GraphRunFailed(f"{type(exc).__name__}: {str(exc)[:500]}") from exc

        return run


def record_failure(report, guarded: Guarded, exc: GraphRunFailed) -> None:
    report.problems.append(f"{guarded.stage}: ONNX Runtime failed running the graph: {exc}")
