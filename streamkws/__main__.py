from streamkws.cli import main

raise SystemExit(main())
