"""NVIDIA Triton Inference Server: a model repository for a package (``config``), its validation with Triton's
own schema (``validate``), the generic python-backend model (``python_model``), a client helper (``client``) and
the wheel's CPU-only tritonserver run locally (``server``). ``mmopt triton`` (``mmopt.jobs.triton``) puts them
together. Nothing here imports tritonclient or the server at import time."""
