"""Precision building blocks shared by the quantize job (``mmopt.jobs.quantize``): converting a component
(``convert``), the ``auto`` policy search (``search``) and per-node int8 sensitivity (``sensitivity``)."""
