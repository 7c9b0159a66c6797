from necrod.daemon.main import main

raise SystemExit(main())
