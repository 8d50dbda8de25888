"""The base of every error a user can fix, shared by mmopt and its device runtime.

mmopt's CLI prints an ``MmoptError`` without a traceback and exits with its ``exit_code``; the runtime's own
errors (a refused package, an engine that cannot run here) are ``MmoptError`` too, so one ``except`` catches
both sides. ``mmopt.errors`` re-exports these and defines the build side's kinds.
"""
from __future__ import annotations


class MmoptError(Exception):
    """Base class of every error a user can fix."""

    exit_code = 1


class BackendUnavailable(MmoptError):
    """An execution backend (TensorRT, a GPU, an ONNX Runtime provider, a Triton server) is missing here."""

    exit_code = 2
