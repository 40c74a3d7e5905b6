from fasttune.cli import main

raise SystemExit(main())
