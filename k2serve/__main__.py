"""``python -m k2serve`` is the ``k2serve`` command."""

from k2serve.cli import main

raise SystemExit(main())
