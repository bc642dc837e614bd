from wfd.daemon import main

raise SystemExit(main())
