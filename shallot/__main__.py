from shallot.cli import main

raise SystemExit(main())
