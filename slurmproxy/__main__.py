from slurmproxy.cli import main

raise SystemExit(main())
