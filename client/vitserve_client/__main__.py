"""`python -m vitserve_client ...`: the same as the `vitserve-client` command."""

from vitserve_client.cli import main

raise SystemExit(main())
