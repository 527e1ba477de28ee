from fluxstack.cli import main

raise SystemExit(main())
