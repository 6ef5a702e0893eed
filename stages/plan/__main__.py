from stages.plan import main

raise SystemExit(main())
