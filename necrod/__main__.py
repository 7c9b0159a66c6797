from necrod.command import main

raise SystemExit(main())
