"""``python -m qlm.localstack up|down|status|fetch-jars``: the local Redis + Kafka."""

from qlm.localstack.cli import main

raise SystemExit(main())
