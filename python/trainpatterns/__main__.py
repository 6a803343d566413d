"""``python -m trainpatterns``: the same command line as the ``trainpatterns`` script."""
from .cli import main

raise SystemExit(main())
