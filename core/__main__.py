from shallot.core.cli import main

raise SystemExit(main())
