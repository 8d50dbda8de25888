"""Judgement shared by every job: parity metrics and gates (``compare``), timing (``latency``), parity of
runners against the eager reference (``parity``) and task accuracy (``accuracy``). Below export,
quantize and bench alike; imports no job."""
