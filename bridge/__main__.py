"""Allow ``python -m bridge`` as well as the ``fieldbridge`` command."""

from bridge.cli import main

raise SystemExit(main())
