"""``python -m bitdance ...`` is the ``bitdance`` command."""

from bitdance.apps.cli import main

raise SystemExit(main())
