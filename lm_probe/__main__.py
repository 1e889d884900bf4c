"""``python -m lm_probe`` runs the command line (see :mod:`lm_probe.app.cli`)."""

from .app.cli import main

raise SystemExit(main())
