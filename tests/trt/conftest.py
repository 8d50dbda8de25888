"""Makes this folder's helpers (trt_bindings, trt_fake_bundle, ...) importable under any pytest import mode."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
