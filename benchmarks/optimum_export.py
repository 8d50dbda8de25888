"""Run by benchmarks/peers.py with the Python of a separate virtual environment that holds Optimum
(its transformers pin conflicts with mmopt's). Exports the saved model at argv[1] to argv[2]."""
import sys

from optimum.exporters.onnx import main_export

main_export(sys.argv[1], output=sys.argv[2], task=sys.argv[3], opset=17, do_validation=True, no_post_process=False)
print("exported")
