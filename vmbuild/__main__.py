from vmbuild.cli import main

raise SystemExit(main())
