"""Typed errors: every failure the user can cause or meet, with the exit code the CLI maps it to.

Each message says what happened, then what was expected or how to fix it ("an overly verbose error
is better than a cryptic one"). Exit codes: 0 ok, 1 validation failed, 2 bad input or unsupported.
"""
from __future__ import annotations


class PrefixExportError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 2


class InputError(PrefixExportError):
    """A path, file or argument the user gave is missing, unreadable or malformed."""


class CheckpointError(InputError):
    """The prefix checkpoint is not a usable prefix-tuning checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint that cannot be loaded with `torch.load(weights_only=True)`."""


class MismatchError(InputError):
    """The prefix does not fit the model (layers, heads, hidden size, dtype, positions)."""


class UnsupportedError(PrefixExportError):
    """The architecture or configuration is not supported (yet)."""


class OutputError(PrefixExportError):
    """The output location cannot be written (exists, not a folder, not writable, disk full)."""


class ExportFailedError(PrefixExportError):
    """torch.onnx.export or ONNX post-processing failed; carries the underlying error."""


class RuntimeSetupError(PrefixExportError):
    """An ONNX Runtime session could not be created (unknown provider, not an export folder)."""


class ValidationError(PrefixExportError):
    """The exported graph does not compute what PEFT computes. Exit code 1."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
