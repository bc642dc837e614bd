from wfctl.cli import main

raise SystemExit(main())
