"""The application layer: the ``lm-probe`` command line, experiment files, their plan and
outputs, the report and the plots.

It knows everything below it (core, probes, consumers, the runner) and nothing in
lm_probe imports it.
"""
