"""The jobs, one module per command, each a list of named steps over the layers below: ``export``,
``quantize``, ``build`` (TensorRT engines) and ``bench``. ``mmopt.api`` is their facade."""
