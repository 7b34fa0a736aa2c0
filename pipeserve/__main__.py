from pipeserve.cli import main

raise SystemExit(main())
