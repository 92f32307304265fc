from coi.cli.main import main

raise SystemExit(main())
