"""``python -m lm_probe`` runs the command line (see :mod:`lm_probe.cli`)."""

from .cli import main

raise SystemExit(main())
